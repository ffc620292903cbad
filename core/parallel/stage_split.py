"""The pipeline split: which decoder blocks each stage holds (NxDT's ``pipeline_cuts`` or a cost balance).

Kept apart from pipeline.py so the planner and ``nxdt inspect`` split a model without importing
``torch.distributed.pipelining``.
"""

from __future__ import annotations

from collections.abc import Sequence

from nxdt.errors import ConfigError

#: pipeline cost of the input embedding and of the LM head, in decoder layers (torchtitan's default)
EMBEDDING_COST = 1
HEAD_COST = 1


def split_blocks(blocks: Sequence[str], n_stages: int, cuts: Sequence[str] | None = None) -> list[list[str]]:
    """The blocks of each stage: after each of ``cuts`` (NxDT semantics), else balanced by cost."""
    blocks = list(blocks)
    if len(blocks) < n_stages:
        raise ConfigError(
            f"pipeline: {len(blocks)} layers cannot fill {n_stages} stages (pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size); every stage needs at least one layer"
        )
    if cuts:
        ends = [_cut_index(blocks, cut) for cut in cuts]
        if len(ends) != n_stages - 1:
            raise ConfigError(
                f"model.pipeline_cuts: {len(ends)} cuts make {len(ends) + 1} stages, but the layout has "
                f"{n_stages} (pipeline_model_parallel_size x virtual_pipeline_model_parallel_size); give {n_stages - 1}"
            )
        if ends != sorted(set(ends)) or ends[-1] >= len(blocks) - 1:
            raise ConfigError(
                f"model.pipeline_cuts {list(cuts)}: cuts must name strictly increasing layers before the last "
                f"({blocks[-1]}); each names the last layer of its stage"
            )
    else:
        ends = _balanced_ends(len(blocks), n_stages)
    starts = [0, *(e + 1 for e in ends)]
    return [blocks[a:b] for a, b in zip(starts, [*starts[1:], len(blocks)])]


def _cut_index(blocks: list[str], cut: str) -> int:
    """Position of ``cut`` in ``blocks``; NxDT's HF names (``model.layers.18``) map to nxdt's (``layers.18``)."""
    for name in (cut, cut.removeprefix("model.")):
        if name in blocks:
            return blocks.index(name)
    raise ConfigError(f"model.pipeline_cuts: {cut!r} names no layer; layers are {blocks[0]} .. {blocks[-1]}")


def _balanced_ends(n_layers: int, n_stages: int) -> list[int]:
    """Last layer index of each stage but the last, minimising the costliest stage (ties: earlier cuts)."""

    def cost(stage: int, first: int, last: int) -> int:
        extra = (EMBEDDING_COST if stage == 0 else 0) + (HEAD_COST if stage == n_stages - 1 else 0)
        return last - first + 1 + extra

    # Contiguous min-max partition by dynamic programming: (stage, its last layer) -> (worst cost, cuts).
    table: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for end in range(n_layers):
        table[(0, end)] = (cost(0, 0, end), [])
    for stage in range(1, n_stages):
        for end in range(stage, n_layers):
            options = []
            for prev in range(stage - 1, end):
                if (stage - 1, prev) in table:
                    worst, ends = table[(stage - 1, prev)]
                    options.append((max(worst, cost(stage, prev + 1, end)), [*ends, prev]))
            if options:
                table[(stage, end)] = min(options, key=lambda o: o[0])
    return table[(n_stages - 1, n_layers - 1)][1]
