"""The `nxdt` command line: list, inspect, plugins, config validate, run, generate, data, checkpoints, export."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from nxdt.errors import NxdtError


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # A sub-command's flags must not reset what was given before it (`nxdt --json list`): only the
    # top level has defaults, the sub-commands' flags set the attribute only when given.
    default = False if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from nxdt import __version__

    parser = argparse.ArgumentParser(prog="nxdt", description="Model hub and distributed training engine for LLMs.")
    parser.add_argument("--version", action="version", version=f"nxdt {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="the model presets the installed plugins offer")
    p.add_argument("--family", help="only this family")
    _add_common(p)

    p = sub.add_parser("inspect", help="architecture, exact parameter count, shard plan and memory of a preset")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="model.* / distributed_strategy.* overrides, key=value")
    _add_common(p)

    p = sub.add_parser("plugins", help="installed plugins, their hooks and load errors")
    _add_common(p)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    v = csub.add_parser("validate", help="load, interpolate and validate a YAML config")
    v.add_argument("file")
    v.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _add_common(v)

    from nxdt.cli import data_commands, generate_command, run_command

    run_command.add_parser(sub, _add_common)
    from nxdt.cli import plan_command

    plan_command.add_parser(sub, _add_common)
    generate_command.add_parser(sub, _add_common)
    data_commands.add_parsers(sub, _add_common)
    from nxdt.cli import checkpoint_commands

    checkpoint_commands.add_parsers(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors are one line on stderr, no traceback."""
    parser = build_parser()
    # key=value overrides may follow options (`run x --recipe sft a.b=1`), which argparse
    # leaves unparsed after its positional list closed; they are still overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("NXDT_DEBUG"))
    if debug:
        os.environ["NXDT_DEBUG"] = "1"
    if not args.command:
        parser.print_help()
        return 0
    try:
        return int(_dispatch(args) or 0)
    except NxdtError as exc:
        if debug:
            raise
        kind = "interrupted" if getattr(exc, "interrupt", False) else "error"
        print(f"nxdt: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nxdt: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # an nxdt bug (or torch's BaseException-derived errors): one line unless --debug
        if debug:
            raise
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        print(f"nxdt: internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int | None:
    from nxdt.cli import data_commands, hub_commands, run_command

    if args.command == "list":
        return hub_commands.cmd_list(args)
    if args.command == "inspect":
        return hub_commands.cmd_inspect(args)
    if args.command == "plugins":
        return hub_commands.cmd_plugins(args)
    if args.command == "config":
        if args.config_command != "validate":
            raise NxdtError("usage: nxdt config validate FILE [key=value ...]")
        return hub_commands.cmd_config_validate(args)
    if args.command == "data":
        return data_commands.dispatch(args)
    if args.command == "plan":
        from nxdt.cli import plan_command

        return plan_command.cmd_plan(args)
    if args.command == "generate":
        from nxdt.cli import generate_command

        return generate_command.cmd_generate(args)
    from nxdt.cli import checkpoint_commands

    handled = checkpoint_commands.dispatch(args)
    if handled is not None:
        return handled
    return run_command.dispatch(args)


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout."""
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
