"""exp_manager checkpoint options that change what a checkpoint holds: use_master_weights_in_ckpt."""

from __future__ import annotations

from multirank import single_trainer, tiny

from nxdt.checkpoint.dcp_io import _metadata_keys
from nxdt.checkpoint.layout import inspect_marker, list_checkpoints
from nxdt.checkpoint.store import Store


def _saved_keys(run_dir) -> set[str]:
    store = Store(str(run_dir / "checkpoints"))
    name = [i for i in list_checkpoints(store) if i.complete][-1].name
    marker, _ = inspect_marker(store, name)
    return set(_metadata_keys(store, name, marker))


def test_master_weights_in_checkpoint_follow_the_key(tmp_path, data_overrides):
    """mixed_precision saves the fp32 master by default; use_master_weights_in_ckpt=false leaves it out,
    and such a checkpoint still resumes (the bf16 weights become the master)."""
    base = [*tiny(2, 2), *data_overrides, "precision.type=mixed_precision", "trainer.limit_test_batches=0"]
    single_trainer(base, tmp_path / "with").fit()
    assert any(k.endswith(".master") for k in _saved_keys(tmp_path / "with"))
    without = [*base, "exp_manager.checkpoint_callback_params.use_master_weights_in_ckpt=false"]
    single_trainer(without, tmp_path / "without").fit()
    keys = _saved_keys(tmp_path / "without")
    assert not any(k.endswith(".master") for k in keys) and any(k.endswith(".exp_avg") for k in keys)
    resumed = single_trainer([*without, "trainer.max_steps=3", "exp_manager.resume_if_exists=true"], tmp_path / "without")
    result = resumed.fit()
    assert len(result.losses) == 1  # steps 3 only: it resumed at step 2
