"""DPO's reference model: precomputed log-probs, a frozen copy of the policy, or the policy without its adapters.

* ``precompute_ref_log_probs=true``: one forward-only pass over the training and validation pairs
  before the first step, each data-parallel rank taking its share of every global batch (on every
  layout, PP included: ``ParallelModel.forward_rows``), the shares summed over DP so every rank
  holds every pair's values; the datasets then carry them in each item (``ref_logps``).
* ``false``: a frozen second model built and parallelised like the policy
  (``parallelize(model, ctx, trainable=False)``), run on each micro-batch before the policy.
* Under LoRA the reference is the policy with its adapters disabled (its frozen base): no second
  model and no extra weights, whether precomputed or live.

The reference is the run's initial policy. ``setup`` runs after any resume: at step 0 the model
*is* the initial policy (initialised, ``model.hf_checkpoint`` or a ``weight_init_only``
checkpoint), and a frozen copy takes its weights; a run resumed mid-way rebuilds the reference as
the run built its model (the seeded initialisation or ``model.hf_checkpoint``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from nxdt.data.batch import collate
from nxdt.errors import ConfigError
from nxdt.recipes.preference import response_logps


class Reference:
    """Where the reference log-probs of a DPO run come from (see the module docstring)."""

    def __init__(self, trainer: Any, mode: str, model: Any = None):
        self.trainer, self.mode, self.model = trainer, mode, model

    @classmethod
    def create(cls, trainer: Any, precompute: bool) -> Reference:
        """The reference of ``trainer``'s run: precomputed into its datasets, or live."""
        lora = trainer.cfg.model_alignment_strategy is not None and trainer.cfg.model_alignment_strategy.peft is not None
        if lora:
            ref = cls(trainer, "adapters")
        elif trainer.state.step == 0 and precompute:
            ref = cls(trainer, "policy")  # the initial policy computes its own reference log-probs
        else:
            ref = cls(trainer, "frozen", build_frozen_copy(trainer, copy_policy=trainer.state.step == 0))
        if precompute:
            for dataset in (trainer.data.train, trainer.data.val):
                if dataset is not None:
                    ref.precompute(dataset)
            # The pass is done: a copy built only for it is dropped, and batches carry the values.
            return cls(trainer, "precomputed")
        return ref

    @contextlib.contextmanager
    def _runner(self):
        """The model computing reference log-probs, in eval mode (adapters off under LoRA)."""
        from nxdt.peft.lora import set_adapters

        model = self.model if self.mode == "frozen" else self.trainer.model
        module = model.trainable_module
        training = module.training
        model.eval()
        if self.mode == "adapters":
            set_adapters(module, False)
        try:
            yield model
        finally:
            if self.mode == "adapters":
                set_adapters(module, True)
            if training:
                model.train()

    def rows(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Reference log-probs of every row of ``micro_batches`` (on every rank)."""
        with self._runner() as model:
            return model.forward_rows(micro_batches, response_logps, self.trainer._autocast)

    def annotate(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Put ``ref_logps`` into each micro-batch (precomputed batches already carry them)."""
        if self.mode == "precomputed":
            return
        for mb, values in zip(micro_batches, self.rows(micro_batches), strict=True):
            mb["ref_logps"] = values

    @torch.no_grad()
    def precompute(self, dataset: Any) -> None:
        """One pass over ``dataset``: every pair's reference log-probs, attached with ``dataset.set_reference``."""
        if not hasattr(dataset, "set_reference"):
            raise ConfigError(
                "model_alignment_strategy.dpo.precompute_ref_log_probs=true needs the preference dataset "
                f"({type(dataset).__name__} cannot carry reference log-probs); set it to false"
            )
        trainer = self.trainer
        cfg, device = trainer.cfg, trainer.world.device
        gbs, mbs, dp = cfg.data.global_batch_size, cfg.data.micro_batch_size, trainer.parallel.dp
        share, rank, n = gbs // dp, trainer.ctx.dp_rank, len(dataset)
        table = torch.zeros(n, 2, device=device)
        # Global batches as validation cuts them: every rank runs grad_accum micro-batches per pass,
        # which a pipeline schedule needs; indices past the end repeat pair 0 and are dropped.
        for start in range(0, n, gbs):
            mine = list(range(start + rank * share, start + (rank + 1) * share))
            groups = [mine[i : i + mbs] for i in range(0, share, mbs)]
            batches = [{k: v.to(device) for k, v in collate([dataset[i if i < n else 0] for i in g]).items()}
                       for g in groups]
            for group, values in zip(groups, self.rows(batches), strict=True):
                keep = [j for j, i in enumerate(group) if i < n]
                table[[group[j] for j in keep]] = values.view(-1, 2)[keep]
        group = trainer.ctx.group("dp")
        if group is not None:
            dist.all_reduce(table, group=group)  # each pair was computed by exactly one DP rank
        dataset.set_reference(table)


def build_frozen_copy(trainer: Any, copy_policy: bool) -> Any:
    """A frozen model parallelised like the policy; with ``copy_policy`` it takes the policy's current weights."""
    from nxdt.parallel.apply import parallelize

    with torch.device("meta"):
        module = trainer.host.build_model(trainer.run.spec, trainer.run.arch)
    frozen = parallelize(module, trainer.ctx, trainable=False)
    frozen.eval()
    if copy_policy:
        theirs = {r.local_name: r.param for r in trainer.model.records}
        with torch.no_grad():
            for record in frozen.records:
                record.param.copy_(theirs[record.local_name])
    return frozen
