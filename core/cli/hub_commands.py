"""`nxdt list`, `nxdt inspect`, `nxdt plugins` and `nxdt config validate`."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from nxdt.cli.main import print_json
from nxdt.errors import ConfigError
from nxdt.model_info import architecture_dict, describe, format_count
from nxdt.plugin_host import get_host


def _console() -> Console:
    # Piped output (scripts, CI logs) gets a wide table instead of rich's 80-column default.
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _builder(host: Any, spec: Any) -> Any:
    """The builder runs use: a plugin's ``nxdt_build_model`` override, else the family's own."""
    return lambda config: host.build_model(spec, config)


def model_status(host: Any, preset: Any) -> str:
    """``ok``; ``presets only``: its plugin is installed but registers no model; ``not installed``; ``plugin error``."""
    if preset.family in host.models:
        return "ok"
    record = host.records.get(preset.plugin)
    if record is not None and not record.ok:
        return "plugin error"
    return "presets only" if record is not None else "not installed"


_STATUS_TEXT = {
    "presets only": "presets only, model not implemented",
    "not installed": "model not installed: pip install nxdt-{family}",
    "plugin error": "plugin failed to load (see `nxdt plugins`)",
}


def preset_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One row per preset, with the exact parameter count when its family's model is installed."""
    host = get_host()
    rows = []
    for preset in sorted(host.presets, key=lambda p: (p.family, p.name)):
        if family and preset.family != family:
            continue
        status = model_status(host, preset)
        params = None
        if status == "ok":
            spec = host.model_spec(preset.family, preset.plugin)
            params = count_parameters_of(host, spec, preset_architecture(host, spec, preset))
        rows.append(
            {
                "name": preset.name,
                "family": preset.family,
                "plugin": preset.plugin,
                "plugin_version": host.plugin_version(preset.plugin),
                "style": preset.style,
                "parameters": params,
                "hf_model_id": preset.hf_model_id,
                "model_installed": status == "ok",
                "status": status,
            }
        )
    return rows


def preset_architecture(host: Any, spec: Any, preset: Any) -> Any:
    """A preset's architecture config straight from its ``model.*`` keys, without composing a run config.

    Presets whose own defaults set architecture keys or use ``${...}`` go through the whole
    resolution (tests check both ways agree on every preset).
    """
    model_defaults = (preset.defaults or {}).get("model") or {}
    plain = all(isinstance(v, dict) and k != "moe" for k, v in model_defaults.items())
    if plain and "${" not in repr(preset.architecture):
        try:
            return spec.config_from_nxdt(dict(preset.architecture))
        except (TypeError, ValueError, KeyError):
            pass  # the resolution below says what is wrong, in its words
    from nxdt.resolve import resolve

    return resolve(preset.name, host=host).arch


def _formula_applies(host: Any, spec: Any) -> bool:
    """Whether the family's count formula describes what runs build (no plugin overrides the build)."""
    return spec.num_parameters is not None and not host.pm.hook.nxdt_build_model.get_hookimpls()


def count_parameters_of(host: Any, spec: Any, arch: Any) -> int:
    """Exact parameter count: the family's formula, unless a plugin overrides the build (then a meta build)."""
    if _formula_applies(host, spec):
        return int(spec.num_parameters(arch))
    return int(describe(spec, arch, 1, _builder(host, spec))["parameters"])


def model_facts(host: Any, spec: Any, arch: Any, seq_length: int) -> dict[str, Any]:
    """Parameters, FLOPs per token (and MoE counts) from the family's formulas; a meta build only without them."""
    if not _formula_applies(host, spec) or (spec.is_moe and spec.active_parameters is None):
        return describe(spec, arch, seq_length, _builder(host, spec))
    info: dict[str, Any] = {
        "parameters": int(spec.num_parameters(arch)),
        "flops_per_token": float(spec.flops_per_token(arch, seq_length)),
        "seq_length": seq_length,
    }
    if spec.is_moe:
        experts = _expert_parameters(arch)
        if experts is None:
            return describe(spec, arch, seq_length, _builder(host, spec))
        info["active_parameters"] = int(spec.active_parameters(arch))
        info["expert_parameters"] = experts
    return info


def _expert_parameters(arch: Any) -> int | None:
    """Expert weights of a kit MoE config (what EP splits), None for configs the kit does not describe."""
    from nxdt.modeling import TransformerConfig
    from nxdt.modeling.moe import moe_parameter_counts

    moe = getattr(arch, "moe", None)
    if not isinstance(arch, TransformerConfig) or moe is None:
        return None
    router = arch.hidden_size * moe.num_experts
    per_layer = moe_parameter_counts(arch.hidden_size, arch.ffn_hidden_size, arch.gated, moe)[0] - router
    return len(moe.moe_layers(arch.num_layers)) * per_layer


def cmd_list(args: argparse.Namespace) -> int:
    """Print the preset table."""
    rows = preset_rows(args.family)
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="nxdt presets")
    for col in ("name", "family", "plugin", "style", "parameters", "hf model"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for r in rows:
        if r["model_installed"]:
            params = format_count(r["parameters"])
        else:
            params = "[dim](" + _STATUS_TEXT[r["status"]].format(family=r["family"]) + ")[/dim]"
        table.add_row(r["name"], r["family"], f"{r['plugin']} {r['plugin_version']}", r["style"], params, r["hf_model_id"] or "-")
    _console().print(table)
    return 0


def inspect_preset(name: str, overrides: list[str]) -> dict[str, Any]:
    """Everything `nxdt inspect` reports about a preset, as a dict."""
    from nxdt.resolve import resolve

    host = get_host()
    resolved = resolve(name, overrides=overrides, host=host)
    cfg, spec = resolved.config, resolved.spec
    seq = cfg.data.seq_length or (resolved.preset.seq_length if resolved.preset else 2048)
    parallel = resolved.parallel_dims()
    info = model_facts(host, spec, resolved.arch, seq)
    try:
        plan = host.shard_plan(spec, resolved.arch, parallel)
    except ValueError as exc:  # a layout the family cannot split (heads or experts over TP / EP)
        raise ConfigError(str(exc)) from None
    preset = resolved.preset
    from nxdt.plan import plan_memory

    # The memory planner on the preset's reference machine (an 80 GB GPU unless it names a CPU).
    device = "cpu" if preset and "cpu" in preset.reference_machine.lower() else "h100"
    memory = plan_memory(resolved, world_size=parallel.world_size, target=device, host=host)
    return {
        "name": name,
        "family": resolved.family,
        "plugin": spec.plugin,
        "style": preset.style if preset else cfg.model_source,
        "hf_model_id": preset.hf_model_id if preset else None,
        "architecture": architecture_dict(resolved.arch),
        **info,
        "shard_plan": plan.as_dict(sequence_parallel=parallel.sequence_parallel),
        "kv_projections": list(plan.kv_projections),
        "distributed_strategy": {
            "tensor_model_parallel_size": parallel.tp,
            "pipeline_model_parallel_size": parallel.pp,
            "expert_model_parallel_size": parallel.ep,
            "data_parallel_size": parallel.dp,
            "sequence_parallel": parallel.sequence_parallel,
            "zero1": bool(cfg.distributed_strategy.zero1),
        },
        "reference_machine": preset.reference_machine if preset else None,
        "precision": cfg.precision.type,
        "memory_per_rank_gib": memory.worst.as_dict() | {"predicted_peak_gib": round(memory.peak_bytes / 2**30, 3)},
        "memory_plan": memory.as_dict(),
        "recipes": host.recipes_for(spec),
        "is_moe": spec.is_moe,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print one preset's architecture, exact counts, shard plan, memory and recipes."""
    info = inspect_preset(args.preset, args.overrides)
    if args.json:
        print_json(info)
        return 0
    console = _console()
    console.print(f"[bold]{info['name']}[/bold]  family={info['family']}  plugin={info['plugin']}  style={info['style']}")
    if info["hf_model_id"]:
        console.print(f"reference HF model: {info['hf_model_id']}")
    arch = Table(title="architecture", show_header=False)
    for k, v in info["architecture"].items():
        arch.add_row(k, str(v))
    console.print(arch)
    counts = f"parameters: {info['parameters']:,} ({format_count(info['parameters'])})"
    if "active_parameters" in info:
        counts += f"   active per token: {info['active_parameters']:,}"
    console.print(counts)
    console.print(f"training FLOPs per token at seq_length {info['seq_length']}: {info['flops_per_token']:.4g}")
    plan = Table(title="shard plan (module glob -> parallel style)")
    plan.add_column("modules")
    plan.add_column("style")
    for k, v in info["shard_plan"].items():
        plan.add_row(k, v)
    console.print(plan)
    ds = info["distributed_strategy"]
    console.print(
        f"default layout ({info['reference_machine']}): TP={ds['tensor_model_parallel_size']} "
        f"PP={ds['pipeline_model_parallel_size']} EP={ds['expert_model_parallel_size']} DP={ds['data_parallel_size']} "
        f"SP={ds['sequence_parallel']} ZeRO-1={ds['zero1']} precision={info['precision']}"
    )
    from nxdt.plan.report import plan_lines

    for line in plan_lines(info["memory_plan"]):
        console.print(line, highlight=False, markup=False)
    console.print(f"recipes: {', '.join(info['recipes']) or '(none)'}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print the plugins, the hooks each implements, and load errors."""
    host = get_host()
    rows = [
        {
            "name": r.name,
            "distribution": r.distribution,
            "version": r.version,
            "module": r.module,
            "hooks": r.hooks,
            "error": r.error,
        }
        for r in host.records.values()
    ]
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="nxdt plugins")
    for col in ("name", "distribution", "version", "hooks", "status"):
        table.add_column(col)
    for r in rows:
        status = f"[red]error: {r['error']}[/red]" if r["error"] else "[green]ok[/green]"
        table.add_row(r["name"], r["distribution"], r["version"], "\n".join(r["hooks"]) or "-", status)
    _console().print(table)
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    """Load, interpolate and validate a YAML file, check its layout against its model; print the resolved config."""
    from nxdt.config import load_run_config

    cfg = load_run_config(args.file, args.overrides)
    from nxdt.cli.preflight import check_config_file

    note = check_config_file(args.file, args.overrides, cfg)
    unused = cfg.unused_keys(backend="torch")
    if args.json:
        print_json({"valid": True, "config": cfg.to_dict(), "unused_keys": unused, "note": note})
        return 0
    print(cfg.to_yaml(), end="")
    if unused:
        print(f"# unused on the torch backend (Neuron-only): {', '.join(unused)}")
    if note:
        print(f"# {note}")
    print(f"# {args.file}: valid")
    return 0
