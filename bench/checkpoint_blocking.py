"""How long a checkpoint save blocks training: synchronous DCP save vs ``async_checkpointing``.

Builds a real nxdt Trainer (one process, CPU) for a Llama of ~25M parameters, takes one optimizer
step so the Adam state exists, then saves the same state several times each way through the
trainer's Checkpointer and reports the median time the training thread was blocked, and the ratio.
Usage: python bench/checkpoint_blocking.py [--repeats 3] [--hidden 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def build_trainer(run_dir: str, hidden: int, layers: int, async_save: bool, data_args: list[str]):
    from nxdt.parallel.world import init_world
    from nxdt.resolve import resolve
    from nxdt.train.trainer import Trainer

    overrides = [
        f"model.hidden_size={hidden}", f"model.num_layers={layers}", "model.num_attention_heads=8",
        "model.num_kv_heads=4", f"model.ffn_hidden_size={hidden * 3}", "data.seq_length=32",
        "data.global_batch_size=2", "data.micro_batch_size=2", "trainer.max_steps=100",
        f"exp_manager.explicit_log_dir={run_dir}", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.save_top_k=-1",
        f"exp_manager.async_checkpointing={str(async_save).lower()}", *data_args,
    ]
    trainer = Trainer(resolve("llama3-tiny", "pretrain", overrides), init_world())
    trainer.setup()
    trainer.train_step(next(trainer.data.train_steps(0)))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("NXDT_DEVICE", "cpu")
    from nxdt.data.embedded import embedded_paths, generate

    with tempfile.TemporaryDirectory() as tmp:
        paths = embedded_paths()
        if not (paths["tokenizer"] / "tokenizer.json").is_file():
            paths = generate(os.path.join(tmp, "embedded"))
        data_args = [f"data.tokenizer.type={paths['tokenizer']}", f"data.train_dir={paths['pretrain_jsonl']}"]
        blocked, total = {}, {}
        for mode in ("sync", "async"):
            trainer = build_trainer(os.path.join(tmp, mode), args.hidden, args.layers, mode == "async", data_args)
            ckpt = trainer.checkpointer
            ends = []
            for i in range(args.repeats):
                trainer.state.step = i + 1
                t0 = time.perf_counter()
                ckpt.save()
                ckpt.wait()  # the next save would wait anyway; measured apart from the blocked time
                ends.append(time.perf_counter() - t0)
            blocked[mode], total[mode] = statistics.median(ckpt.blocked_s), statistics.median(ends)
            params = sum(p.numel() for p in trainer.model.trainable_module.parameters())
        print(f"model: {params / 1e6:.1f}M parameters (+ Adam state), {args.repeats} saves each, local disk")
        for mode in ("sync", "async"):
            print(f"{mode:>5}: training blocked {blocked[mode] * 1e3:8.1f} ms per save; save complete after "
                  f"{total[mode] * 1e3:8.1f} ms")
        print(f"ratio blocked async / sync: {blocked['async'] / blocked['sync']:.3f}")


if __name__ == "__main__":
    main()
