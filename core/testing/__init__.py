"""Test helpers for nxdt and its plugins: the model-spec conformance kit."""

from nxdt.testing.conformance import (
    build_hf_model,
    build_initialized,
    build_on_meta,
    check_adapter_round_trip,
    check_builds_on_meta,
    check_config_round_trip,
    check_hf_parity,
    check_init_weights,
    check_named_modules,
    check_shard_plan_matches,
    load_into_hf,
    run_conformance,
)

__all__ = [
    "build_hf_model",
    "build_initialized",
    "build_on_meta",
    "check_adapter_round_trip",
    "check_builds_on_meta",
    "check_config_round_trip",
    "check_hf_parity",
    "check_init_weights",
    "check_named_modules",
    "check_shard_plan_matches",
    "load_into_hf",
    "run_conformance",
]
