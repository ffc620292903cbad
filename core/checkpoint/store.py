"""Where checkpoint bytes live: a local directory or an ``s3://`` prefix, both through fsspec."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import fsspec

from nxdt.errors import NxdtError

_HASH_CHUNK = 8 << 20


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than file:// (s3://, gs://, memory://)."""
    return "://" in url and not url.startswith("file://")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: S3 endpoint from AWS_ENDPOINT_URL(_S3) and retries on transient errors.

    Credentials are left to botocore's own chain (env vars, profiles, instance roles) so that
    they never pass through nxdt's config or logs.
    """
    if not url.startswith("s3://"):
        return {}
    opts: dict[str, Any] = {
        # botocore retries throttling, 5xx and connection errors with backoff ("standard" mode)
        "config_kwargs": {"retries": {"max_attempts": 8, "mode": "standard"}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


class Store:
    """A checkpoint root: lists, reads, writes and removes files relative to it."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.remote = is_remote(self.root)
        self.options = storage_options(self.root)
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.root, **self.options)
        except (ImportError, ValueError) as exc:
            raise NxdtError(f"cannot open checkpoint location {self.root}: {exc}") from None

    def url(self, *parts: str) -> str:
        """The full path or URL of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def refresh(self) -> None:
        """Forget cached listings (another process may have written since)."""
        self.fs.invalidate_cache()

    def list_dirs(self) -> list[str]:
        """Names of the directories directly under the root ([] when the root does not exist)."""
        self.refresh()
        try:
            entries = self.fs.ls(self.base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def files(self, name: str) -> dict[str, int]:
        """Relative path -> size of every file under directory ``name``."""
        self.refresh()
        prefix = self._p(name).rstrip("/") + "/"
        try:
            found = self.fs.find(self._p(name), detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(prefix):]: int(info["size"]) for path, info in found.items() if info["type"] == "file"}

    def exists(self, *parts: str) -> bool:
        """Whether the file or directory exists."""
        return self.fs.exists(self._p(*parts))

    def read_text(self, *parts: str) -> str | None:
        """A small text file's contents, or None when it is absent."""
        try:
            with self.fs.open(self._p(*parts), "r", encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small text file; locally through a rename so readers never see half of it."""
        self.write_bytes(text.encode("utf-8"), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a file; locally through a rename so readers never see half of it."""
        path = self._p(*parts)
        if self.remote:  # an S3 PUT is atomic: the object appears whole or not at all
            with self.fs.open(path, "wb") as f:
                f.write(data)
            return
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def sha256(self, *parts: str) -> str:
        """SHA-256 of a file, streamed."""
        digest = hashlib.sha256()
        with self.fs.open(self._p(*parts), "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def size(self, *parts: str) -> int | None:
        """A file's size in bytes, or None when it is absent."""
        try:
            return int(self.fs.size(self._p(*parts)))
        except FileNotFoundError:
            return None

    def remove(self, name: str, first: str | None = None) -> None:
        """Delete directory ``name`` and everything in it; file ``first`` (the marker) before the rest."""
        if first is not None:
            try:
                self.fs.rm(self._p(name, first))
            except FileNotFoundError:
                pass
        try:
            self.fs.rm(self._p(name), recursive=True)
        except FileNotFoundError:
            pass
        self.refresh()

    def rename(self, name: str, new_name: str, last: str | None = None) -> None:
        """Move directory ``name`` to ``new_name`` (absent); on S3 file ``last`` (the marker) moves last.

        A local rename is atomic. S3 has no rename: every object is copied, ``last`` last, then the
        source is deleted ``last`` first, so at no moment does a complete-looking copy lack a file.
        """
        if not self.remote:
            os.rename(self._p(name), self._p(new_name))
            self.refresh()
            return
        files = sorted(self.files(name), key=lambda rel: rel == last)
        for rel in files:
            self.fs.copy(self._p(name, rel), self._p(new_name, rel))
        self.remove(name, first=last)

    def free_bytes(self) -> int | None:
        """Bytes free on the file system of a local root (its nearest existing parent); None on S3."""
        if self.remote:
            return None
        path = self.base
        while path and not os.path.exists(path):
            path = os.path.dirname(path.rstrip("/")) or "/"
        try:
            st = os.statvfs(path or ".")
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def writer(self, name: str):
        """A DCP StorageWriter for checkpoint directory ``name``."""
        from torch.distributed.checkpoint import FileSystemWriter

        if self.remote:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            return FsspecWriter(self.url(name), **self.options)
        return FileSystemWriter(self.url(name))

    def reader(self, name: str):
        """A DCP StorageReader for checkpoint directory ``name`` that never unpickles objects (safe_read)."""
        from nxdt.checkpoint.safe_read import SafeFileSystemReader, SafeFsspecReader

        if self.remote:
            return SafeFsspecReader(self.url(name), where=self.url(name), **self.options)
        return SafeFileSystemReader(self.url(name), where=self.url(name))


def split_checkpoint_url(path: str) -> tuple[Store, str]:
    """A checkpoint directory path/URL as (store of its parent, its name)."""
    path = str(path).rstrip("/")
    parent, _, name = path.rpartition("/")
    if not name:
        raise NxdtError(f"not a checkpoint directory: {path!r}")
    return Store(parent or "."), name
