"""The training loop: micro-batches, accumulation, clipping, logging, validation and checkpoints.

The trainer sees a model only through its ModelSpec, the plugin host and the run context; it
never imports model code. The recipe's objective returns loss *sums* and counts its normaliser
units (tokens, pairs) before the forward; each micro-batch's sum is divided by the units of the
whole global batch, so the loss and the gradients are the same whatever the data-parallel size
and accumulation split. Objective metrics are (sum, count) pairs, logged as global means.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from nxdt.errors import ConfigError, NxdtError
from nxdt.parallel.model import StepStats
from nxdt.parallel.world import World
from nxdt.plugin_host import PluginHost
from nxdt.resolve import ResolvedRun
from nxdt.run_context import RunContext
from nxdt.train.exp_manager import MetricsLogger, run_directory
from nxdt.train.fit_check import check_model_fits
from nxdt.train.memory import MemoryMonitor
from nxdt.train.optim import build_optimizer
from nxdt.train.progress import ProgressReporter
from nxdt.train.schedules import build_scheduler

logger = logging.getLogger("nxdt.train")


@dataclass
class TrainState:
    """What advances each optimizer step (checkpointed with the model and optimizer)."""

    step: int = 0
    consumed_samples: int = 0
    skipped_nan_steps: int = 0


@dataclass
class TrainResult:
    """A finished run's losses and where its files are."""

    run_dir: str
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Builds the model, data and optimizer of a resolved run, and trains it."""

    def __init__(self, resolved: ResolvedRun, world: World, host: PluginHost | None = None):
        self.memory = MemoryMonitor(world.device)  # the baseline: after imports and the process group
        self.ctx = RunContext.create(resolved, world, host)
        self.state = TrainState()
        self.run_dir = run_directory(self.cfg, world.is_distributed)

    # The run context's facts, under the names the recipes and checkpoint code read.
    run = property(lambda self: self.ctx.run)
    cfg = property(lambda self: self.ctx.cfg)
    world = property(lambda self: self.ctx.world)
    host = property(lambda self: self.ctx.host)
    parallel = property(lambda self: self.ctx.parallel)
    mesh = property(lambda self: self.ctx.mesh)
    grad_accum = property(lambda self: self.ctx.grad_accum)
    precision = property(lambda self: self.ctx.precision)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build (on meta), parallelize and materialize the model; build data, objective, optimizer and schedule."""
        from nxdt.parallel.apply import parallelize
        from nxdt.recipes.data import build_data
        from nxdt.recipes.losses import as_objective

        ctx, cfg = self.ctx, self.cfg
        torch.manual_seed(cfg.seed)
        with torch.device("meta"):
            model = self.host.build_model(self.run.spec, self.run.arch)
        check_model_fits(ctx, model)  # before any weight is allocated
        self.model = parallelize(model, ctx)
        self.memory.mark("build")
        loss_name = self.run.recipe.loss if self.run.recipe else "causal_lm"
        self.objective = as_objective(self.host.loss(loss_name).build(cfg, self.run.spec))
        self.data = build_data(ctx)
        optim_cfg = cfg.model.optim
        self.optimizer = self.model.build_optimizer(build_optimizer, optim_cfg, cfg.model.do_layer_norm_weight_decay)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg.sched, optim_cfg.lr, self.max_steps)
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.world.is_main, tensorboard=bool(cfg.exp_manager.create_tensorboard_logger)
        )
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        from nxdt.train.checkpointing import build_checkpointer

        self.checkpointer = build_checkpointer(self)
        self.memory.setup_done(self.model, self.optimizer)
        # Dropout draws from the global generator: equal on the TP ranks of one replica (their
        # replicated activations must agree), different across data-parallel replicas.
        torch.manual_seed(cfg.seed + 7919 * ctx.dp_rank + 1)

    @property
    def loss_fn(self) -> Any:
        """The objective (kept under its plugin API 1 name)."""
        return self.objective

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training set."""
        return max(1, self.data.train_samples // self.cfg.data.global_batch_size)

    @property
    def max_steps(self) -> int:
        """``trainer.max_steps``, or ``max_epochs`` epochs of the training set when max_steps is unset (-1)."""
        max_steps = self.cfg.trainer.max_steps
        epochs = self.cfg.trainer.max_epochs
        if (max_steps is None or max_steps < 0) and epochs and epochs > 0:
            return epochs * self.steps_per_epoch
        if max_steps is None or max_steps < 0:
            raise ConfigError("set trainer.max_steps or trainer.max_epochs (a positive number)")
        return max_steps

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        stack = contextlib.ExitStack()
        if self.precision.compute_dtype == "bf16" and self.precision.param_dtype == "fp32":
            stack.enter_context(torch.autocast(self.world.device.type, dtype=torch.bfloat16))
        if not self.cfg.model.fusions.flash_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # fusions.flash_attention=false: the unfused (math) attention kernel
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def _all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.parallel.dp > 1:
            dist.all_reduce(tensor, group=self.mesh["dp"].get_group())
        return tensor

    def _global_metrics(self, stats: StepStats) -> dict[str, float]:
        """Objective metrics as global means: (sum, count) pairs summed over DP, then divided."""
        if not stats.metrics:
            return {}
        names = sorted(stats.metrics)
        pairs = self._all_reduce_dp(torch.stack([stats.metrics[n] for n in names]))
        return {n: (s / max(c, 1e-12)) for n, (s, c) in zip(names, pairs.tolist())}

    def _annotate(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Let the objective add per-row inputs to the micro-batches before the forward (a DPO reference's log-probs)."""
        annotate = getattr(self.objective, "annotate", None)
        if annotate is not None:
            annotate(micro_batches)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward/backward over the step's micro-batches, then clip and update."""
        model = self.model
        self._annotate(micro_batches)
        # The objective's units of the whole global batch normalise every micro-batch's loss sum. They
        # stay a device tensor until the loss is read, so an accelerator is synchronised once per step.
        local_units = torch.stack([self.objective.count(mb) for mb in micro_batches]).sum().float()
        global_units = self._all_reduce_dp(local_units.reshape(1))[0]
        # DDP averages gradients over DP ranks; multiplying by dp makes that average a global sum.
        scale = self.parallel.dp / global_units.clamp_min(1.0)
        stats = model.forward_backward(micro_batches, self.objective, scale, self._autocast, 1.0 / len(micro_batches))
        loss_total, units = torch.cat([self._all_reduce_dp(stats.loss.reshape(1)), global_units.reshape(1)]).tolist()
        if units == 0:
            raise NxdtError(f"step {self.state.step + 1}: the global batch has nothing to train on (all labels masked)")
        loss = loss_total / units
        metrics: dict[str, float] = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
        metrics.update(self._global_metrics(stats))
        if not math.isfinite(loss):
            return metrics | {"nonfinite": 1.0}
        model.finalize_gradients()
        clip = self.cfg.trainer.gradient_clip_val
        grad_norm = model.clip_grad_norm(clip if clip and clip > 0 else None)
        if self.cfg.exp_manager.log_gradient_norm or clip:
            metrics["grad_norm"] = grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, limit: int | None = None) -> dict[str, float] | None:
        """Validation loss (global mean per objective unit) and metrics, over ``limit_val_batches`` batches."""
        batches = self.data.val_batches(limit)
        if batches is None:
            return None
        self.model.eval()
        self._annotate(batches)
        stats, units = self.model.forward_loss(batches, self.objective, self._autocast)
        self.model.train()
        pair = self._all_reduce_dp(torch.stack([stats.loss, units.float()]))
        out = {"val_loss": (pair[0] / pair[1].clamp_min(1)).item()}
        out.update({f"val_{k}": v for k, v in self._global_metrics(stats).items()})
        return out

    def _validation_due(self, step: int, max_steps: int) -> bool:
        """Lightning semantics: ``val_check_interval`` (steps, or a fraction of an epoch), epochs, the end."""
        trainer_cfg = self.cfg.trainer
        if step == max_steps:
            return True
        every = trainer_cfg.val_check_interval
        if isinstance(every, float) and 0 < every <= 1:
            every = max(1, int(self.steps_per_epoch * every))
        if isinstance(every, int | float) and every > 0 and step % int(every) == 0:
            return True
        epochs = trainer_cfg.check_val_every_n_epoch
        return bool(epochs) and step % (epochs * self.steps_per_epoch) == 0

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``max_steps``; resume and checkpoint as exp_manager asks."""
        t0 = time.perf_counter()
        self.setup()
        result = TrainResult(run_dir=str(self.run_dir))
        t1 = time.perf_counter()
        self.checkpointer.maybe_resume()
        if self.cfg.exp_manager.enable_recovery_time_instrumentation and self.world.is_main:
            # How long a restarted job takes to get back to training (NxDT's recovery instrumentation).
            print(f"nxdt: recovery time: set-up {t1 - t0:.2f} s, checkpoint load {time.perf_counter() - t1:.2f} s "
                  f"(resumed at step {self.state.step})", flush=True)
        setup_objective = getattr(self.objective, "setup", None)
        if setup_objective is not None:
            # After any resume: state.step == 0 means the model is the run's initial policy (a DPO reference).
            setup_objective(self)
        baseline = self._evaluate(before=True) if self.state.step == 0 else {}
        max_steps = self.max_steps
        log_every = max(1, self.cfg.trainer.log_every_n_steps or 1)
        progress = ProgressReporter(max_steps, self.state.step, enabled=self.world.is_main)
        self._report_start(progress)
        sanity = self.cfg.trainer.num_sanity_val_steps
        if sanity and self.state.step == 0:
            checked = self.validate(limit=sanity)
            if checked is not None:
                progress.print(f"sanity validation ({sanity} batches): val_loss={checked['val_loss']:.4f}")
        flops_per_token = self.run.spec.flops_per_token(self.run.arch, self.cfg.data.seq_length)
        peak = _peak_flops(self.world.device)
        # A sample may hold several rows (a preference pair: chosen and rejected), of its own length.
        first = self.data.train[0]["input_ids"]
        tokens_per_step = self.cfg.data.global_batch_size * first.numel()
        batches = self.data.train_steps(self.state.consumed_samples)
        try:
            while self.state.step < max_steps:
                t0 = time.perf_counter()
                micro_batches = next(batches)
                with self.memory.step():
                    metrics = self.train_step(micro_batches)
                self.state.consumed_samples += self.cfg.data.global_batch_size
                if "nonfinite" in metrics:
                    self._handle_nonfinite(metrics["loss"], progress)
                    continue
                self.state.step += 1
                step = self.state.step
                elapsed = time.perf_counter() - t0
                metrics["tokens_per_s"] = tokens_per_step / elapsed
                metrics["step_time_s"] = elapsed
                metrics["consumed_samples"] = self.state.consumed_samples
                if peak:
                    metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / (peak * self.world.world_size)
                if self.cfg.exp_manager.log_parameter_norm:
                    metrics["param_norm"] = self.model.parameter_norm()
                if self._validation_due(step, max_steps):
                    val = self.validate()
                    if val is not None:
                        metrics.update(val)
                        result.val_losses[step] = val["val_loss"]
                result.losses.append(metrics["loss"])
                log_now = step % log_every == 0 or step == max_steps
                if log_now or "val_loss" in metrics:
                    metrics.update(self.memory.step_metrics(self.world.is_distributed))
                    self.logger.log(step, metrics)
                progress.update(step, metrics, log_line=log_now)
                self.checkpointer.maybe_save(final=step == max_steps)
        finally:
            progress.close()
            self.checkpointer.close()
        result.metrics = self._final_metrics(baseline, progress)
        result.metrics["memory_per_rank"] = self.memory.report(self.world.is_distributed)
        self.logger.close()
        return result

    def _handle_nonfinite(self, loss: float, progress: ProgressReporter) -> None:
        step = self.state.step + 1
        allowed = self.cfg.trainer.skip_nan_steps or 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.skipped_nan_steps >= allowed:
            raise NxdtError(
                f"step {step}: loss is {loss} (not finite); stopping. Lower the learning rate, check the data, "
                f"or allow skipping with trainer.skip_nan_steps=N"
            )
        self.state.skipped_nan_steps += 1
        progress.print(f"step {step}: loss is {loss}; update skipped ({self.state.skipped_nan_steps}/{allowed})")

    def _report_start(self, progress: ProgressReporter) -> None:
        p = self.parallel
        progress.print(
            f"nxdt: {self.run.source} ({self.run.family}), recipe={self.run.recipe.name if self.run.recipe else '-'}, "
            f"world={self.world.world_size} (dp={p.dp} tp={p.tp} pp={p.pp}), device={self.world.device.type}, "
            f"precision={self.cfg.precision.type}, grad_accum={self.grad_accum}, run_dir={self.run_dir}"
        )
        for line in self.run.notes:
            progress.print(f"note: {line}")
        for line in self.data.report():
            progress.print(line)

    def _evaluate(self, before: bool = False) -> dict[str, float]:
        recipe = self.run.recipe
        if recipe is None or recipe.evaluate is None:
            return {}
        if before and self.cfg.model_alignment_strategy is not None:
            sft = self.cfg.model_alignment_strategy.sft
            if sft is not None and not sft.evaluate_before_training:
                return {}
        if self.parallel.pp > 1:
            # Task metrics generate token by token through the whole model, which no pipeline rank holds.
            if self.world.is_main:
                logger.warning("%s task metrics are skipped under pipeline parallelism (pp=%d)", recipe.name, self.parallel.pp)
            return {}
        return recipe.evaluate(self) or {}

    def _final_metrics(self, baseline: dict[str, float], progress: ProgressReporter) -> dict[str, Any]:
        """The recipe's task metrics after training, beside the same metrics before it."""
        metrics: dict[str, Any] = dict(self._evaluate())
        metrics.update({f"{k}_before_training": v for k, v in baseline.items()})
        if metrics:
            self.logger.log(self.state.step, metrics)
            progress.print("task metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators (FLOP/s); None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12)):
        if key in name:
            return peak
    return None
