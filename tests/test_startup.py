"""Start-up: `nxdt list`, `inspect`, `plugins`, `config validate` and `--help` build no model (counts
and FLOPs come from the families' formulas, checked against a meta build for every preset), import
nothing heavy beyond torch, and `nxdt list` costs at most 1.5x `import torch`, measured side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "nxdt-configs"


NXDT_YAML = """\
name: hf_llama
model_source: hf
trainer: {max_steps: 10}
data: {micro_batch_size: 1, global_batch_size: 8, seq_length: 4096}
model: {num_layers: 32, hidden_size: 4096, num_attention_heads: 32, num_kv_heads: 8, ffn_hidden_size: 14336,
        max_position_embeddings: 8192, vocab_size: 128256}
"""


def test_read_only_commands_build_no_model(monkeypatch, capsys, tmp_path):
    """Every language model has an embedding table: list, plugins, config validate and --help construct none;
    inspect's counts and FLOPs come from the formulas (its memory plan places parameters from one meta build)."""
    import nxdt.cli.hub_commands
    from nxdt.cli.main import main

    built: list[int] = []

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    def counted(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    original = torch.nn.Embedding.__init__
    monkeypatch.setattr(nxdt.cli.hub_commands, "describe", refuse)  # the meta-build count path
    monkeypatch.setattr(torch.nn.Embedding, "__init__", refuse)
    assert main(["list"]) == 0
    assert main(["plugins"]) == 0
    anchor = ANCHORS / "hf_llama3_8B_config.yaml"
    if not anchor.is_file():  # the upstream file sits beside the checkout; a Llama-3-8B YAML of our own otherwise
        anchor = tmp_path / "hf_llama3_8B_config.yaml"
        anchor.write_text(NXDT_YAML)
    assert main(["config", "validate", str(anchor)]) == 0
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    monkeypatch.setattr(torch.nn.Embedding, "__init__", counted)
    assert main(["--json", "inspect", "mixtral-8x7b"]) == 0
    assert main(["inspect", "llama3-70b", "model.num_layers=4"]) == 0
    assert len(built) <= 2  # one meta build each, the memory planner's
    capsys.readouterr()


def test_list_imports_nothing_heavy():
    """`nxdt list` in a fresh process loads neither DTensor (and sympy with it) nor transformers."""
    code = ("import io, contextlib, sys\nfrom nxdt.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['list'])\n"
            "print(sorted(m for m in ('sympy', 'torch.distributed.tensor', 'transformers', 'nxdt.config') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"imported at start-up: {res.stdout.strip()} (import them where they are used)"


@pytest.mark.slow
def test_formulas_equal_meta_builds_for_every_preset():
    """For each preset: the list's architecture equals the full resolution's, and the formula counts a meta build."""
    from nxdt.cli.hub_commands import model_facts, model_status, preset_architecture
    from nxdt.model_info import describe
    from nxdt.plugin_host import get_host
    from nxdt.resolve import resolve

    host = get_host()
    checked = 0
    for preset in host.presets:
        if model_status(host, preset) != "ok":
            continue
        resolved = resolve(preset.name, host=host)
        assert preset_architecture(host, resolved.spec, preset) == resolved.arch, preset.name
        built = describe(resolved.spec, resolved.arch, 128)
        formula = model_facts(host, resolved.spec, resolved.arch, 128)
        assert formula == built, preset.name
        checked += 1
    assert checked >= 15
