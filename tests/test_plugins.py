"""The plugin contract as a user meets it: real pip-installed out-of-tree plugins and the CLI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_packages import write_plugin as _write_plugin

from nxdt import hookspecs
from nxdt.plugin_host import PluginHost

ROOT = Path(__file__).resolve().parents[1]
NXDT = [sys.executable, "-m", "nxdt.cli.main"]


def nxdt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (so new entry points are seen)."""
    return subprocess.run([*NXDT, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


GOOD = """
    from nxdt import hookimpl
    from nxdt.specs import PresetSpec

    NXDT_PLUGIN_API = 1

    @hookimpl
    def nxdt_register_presets(register):
        register(PresetSpec(name="thirdparty-mini", family="llama", plugin="thirdparty", style="hf",
                            hf_model_id="example/mini",
                            architecture={"vocab_size": 512, "hidden_size": 64, "num_layers": 2,
                                          "num_attention_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 128},
                            seq_length=64))
"""
MISSPELLED = """
    from nxdt import hookimpl

    @hookimpl
    def nxdt_register_model(register):   # not a hook: the spec is nxdt_register_models
        pass
"""
IMPORT_ERROR = """
    import this_module_does_not_exist_anywhere
"""
DUPLICATE = """
    from nxdt import hookimpl
    from nxdt.specs import PresetSpec

    @hookimpl
    def nxdt_register_presets(register):
        register(PresetSpec(name="llama3-tiny", family="llama", plugin="dupe", style="hf", hf_model_id="x",
                            architecture={"vocab_size": 512}))
"""


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """Build and pip-install four throwaway plugins into this environment, then remove them."""
    root = tmp_path_factory.mktemp("plugins")
    pkgs = [
        _write_plugin(root, "nxdt-thirdparty", "nxdt_thirdparty", "thirdparty", GOOD),
        _write_plugin(root, "nxdt-misspelled", "nxdt_misspelled", "misspelled", MISSPELLED),
        _write_plugin(root, "nxdt-importerror", "nxdt_importerror", "importerror", IMPORT_ERROR),
        _write_plugin(root, "nxdt-dupe", "nxdt_dupe", "dupe", DUPLICATE),
    ]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, *map(str, pkgs)], check=True, capture_output=True, timeout=300)
    yield
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", "nxdt-thirdparty", "nxdt-misspelled", "nxdt-importerror", "nxdt-dupe"],
        check=False,
        capture_output=True,
    )


def test_out_of_tree_plugins(installed_plugins):
    res = nxdt("plugins", "--json")
    assert res.returncode == 0, res.stderr
    records = {r["name"]: r for r in json.loads(res.stdout)}
    good = records["thirdparty"]
    assert good["error"] is None and good["version"] == "0.3.1" and good["hooks"] == ["nxdt_register_presets"]
    assert "nxdt_register_model" in records["misspelled"]["error"]
    assert "this_module_does_not_exist_anywhere" in records["importerror"]["error"]
    # The duplicate names both its sources and leaves the catalogue's preset in place.
    assert "llama3-tiny" in records["dupe"]["error"] and "hub_registry.toml" in records["dupe"]["error"]
    assert records["llama"]["error"] is None

    listing = nxdt("list", "--json", "--family", "llama")
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["thirdparty-mini"]["plugin"] == "thirdparty"
    assert rows["thirdparty-mini"]["plugin_version"] == "0.3.1"
    assert rows["thirdparty-mini"]["parameters"] > 0

    only = nxdt("plugins", "--json", env={"NXDT_LOAD_PLUGINS": "llama,thirdparty"})
    assert {r["name"] for r in json.loads(only.stdout)} == {"nxdt", "llama", "thirdparty"}


def test_every_hookspec_is_documented_with_its_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("nxdt_")]
    assert len(specs) >= 7
    for fn in specs:
        sig = inspect.signature(fn)
        params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
        expected = f"### `{fn.__name__}({params}) -> {sig.return_annotation}`"
        assert expected in doc, f"docs/plugins.md lacks the exact signature line {expected!r}"

def test_in_process_plugin_override_of_shard_plan():
    """A firstresult hook lets one plugin replace another family's shard plan."""
    import types

    from nxdt import hookimpl
    from nxdt.specs import ParallelDims, ShardPlan

    module = types.ModuleType("tuned_plan")

    @hookimpl
    def nxdt_shard_plan(spec, config, parallel):
        return ShardPlan(rules={"output": "lm_head"}, notes="tuned") if spec.family == "llama" else None

    module.nxdt_shard_plan = nxdt_shard_plan
    host = PluginHost(only=["llama"], extra_plugins=[("tuned", module)])
    spec = host.model_spec("llama")
    cfg = spec.config_from_nxdt({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128})
    assert host.shard_plan(spec, cfg, ParallelDims()).notes == "tuned"
    assert "layers.*.attention.wq" in PluginHost(only=["llama"]).shard_plan(spec, cfg, ParallelDims()).rules
