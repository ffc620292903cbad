"""Fixtures shared by the test files."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

# Test helpers (multirank.py, the drivers) import each other by module name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def data_overrides() -> list[str]:
    """The embedded SFT data and tokenizer, named explicitly."""
    from multirank import embedded_data_overrides

    return embedded_data_overrides()


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on loopback with the buckets the tests use; the AWS variables pointing at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    for bucket in ("ckpts", "hostile"):
        client.create_bucket(Bucket=bucket)
    yield env
    server.stop()
