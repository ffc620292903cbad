"""Test helpers for nxdt and its plugins: the model-spec conformance kit (single-process and layout checks)."""

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
    check_override_hooks,
    check_shard_plan_matches,
    load_into_hf,
    run_conformance,
)
from nxdt.testing.layouts import (
    check_packed_documents,
    check_pipeline_split,
    check_tensor_parallel,
    sample_inputs,
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
    "check_override_hooks",
    "check_packed_documents",
    "check_pipeline_split",
    "check_tensor_parallel",
    "check_shard_plan_matches",
    "load_into_hf",
    "run_conformance",
    "sample_inputs",
]
