"""Run configuration: typed models of the NxDT/NeMo YAML and the loader that builds them."""

from nxdt.config.loader import (
    compose,
    format_validation_error,
    load_run_config,
    load_yaml,
    register_resolvers,
    validate,
)
from nxdt.config.schema import (
    CheckpointCallbackParams,
    DataSection,
    DistributedStrategySection,
    DpoSection,
    ExpManagerSection,
    ModelAlignmentSection,
    OrpoSection,
    PeftSection,
    RunConfig,
    SftSection,
    TokenizerSection,
    TrainerSection,
)
from nxdt.config.sections_model import (
    ARCHITECTURE_KEYS,
    FusionsSection,
    ModelSection,
    MoeSection,
    OptimSection,
    SchedSection,
)
from nxdt.config.sections_precision import PrecisionSection, ResolvedPrecision

__all__ = [
    "ARCHITECTURE_KEYS",
    "CheckpointCallbackParams",
    "DataSection",
    "DistributedStrategySection",
    "DpoSection",
    "ExpManagerSection",
    "FusionsSection",
    "ModelAlignmentSection",
    "ModelSection",
    "MoeSection",
    "OptimSection",
    "OrpoSection",
    "PeftSection",
    "PrecisionSection",
    "ResolvedPrecision",
    "RunConfig",
    "SchedSection",
    "SftSection",
    "TokenizerSection",
    "TrainerSection",
    "compose",
    "format_validation_error",
    "load_run_config",
    "load_yaml",
    "register_resolvers",
    "validate",
]
