"""Checkpoints and runs against hostile input and careless operators (issue 14), in one process where possible:
pickle payloads in checkpoint metadata and shards (local and S3), ownership in a shared checkpoint
directory, replacing a fixed-name checkpoint, malformed markers, filename templates, a model that does
not fit the checkpoint, interpolation bombs, binary data, metrics.jsonl, and a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from multirank import single_trainer, tiny

from nxdt.checkpoint.layout import MARKER, inspect_marker, latest_complete, list_checkpoints
from nxdt.checkpoint.store import Store
from nxdt.cli.main import main
from nxdt.errors import NxdtError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NXDT_DEVICE": "cpu"}
STEP2 = "nxdt--step=2-consumed_samples=16"


class Payload:
    """Pickles into a call that creates the canary file: what a crafted checkpoint would run."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def rewrite_marker(ckpt: Path, **changes) -> None:
    """Re-hash every file into the marker (as whoever crafts a checkpoint can), then apply ``changes``."""
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"] = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                       for p in sorted(ckpt.iterdir()) if p.name != MARKER}
    marker.update(changes)
    (ckpt / MARKER).write_text(json.dumps(marker))


def craft_metadata_payload(src: Path, dst: Path, canary: Path) -> Path:
    """A copy of checkpoint ``src`` whose .metadata is a pickle that runs a command, with a matching marker."""
    shutil.copytree(src, dst)
    (dst / ".metadata").write_bytes(pickle.dumps(Payload(canary)))
    rewrite_marker(dst)
    return dst


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("nxdt: warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_overrides) -> Path:
    """A run without any checkpoint settings: NeMo's default saves one final checkpoint (step 2)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    single_trainer([*tiny(2, 2), *data_overrides], run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def base_ckpt(base) -> Path:
    return base / "checkpoints" / STEP2


def test_default_run_saves_a_final_checkpoint_for_the_readme_flow(base, tmp_path, capsys):
    """`nxdt checkpoints`, `nxdt export` and from_pretrained work on a run that set nothing about checkpoints."""
    import nxdt

    assert main(["checkpoints", str(base), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["name"], c["complete"], c["step"]) for c in listed] == [(STEP2, True, 2)]
    assert listed[0]["run_id"] == (base / "nxdt_run_id").read_text().strip()
    assert main(["export", str(base / "checkpoints" / STEP2), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert nxdt.from_pretrained(str(tmp_path / "hf")) is not None


# -- no code from checkpoint data -------------------------------------------------------------
def test_export_refuses_a_pickle_payload(base_ckpt, tmp_path, capsys):
    """`nxdt export` of a crafted .metadata: one line naming the file; the payload never runs."""
    canary = tmp_path / "canary"
    evil = craft_metadata_payload(base_ckpt, tmp_path / "evil", canary)
    assert main(["export", str(evil), "--to", "hf", str(tmp_path / "hf")]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"{evil}/.metadata" in line and "posix.system" in line
    assert not canary.exists()


@pytest.mark.parametrize("how", ["resume_from_checkpoint", "weight_init_only", "auto_resume"])
def test_resume_refuses_a_pickle_payload(base, base_ckpt, tmp_path, data_overrides, how):
    """Resume, weights-only init and auto-resume refuse the crafted metadata before it runs."""
    canary = tmp_path / "canary"
    run_dir = tmp_path / "run"
    if how == "auto_resume":  # the crafted checkpoint sits in the run's own directory, with the run's id
        run_dir.mkdir()
        shutil.copy(base / "nxdt_run_id", run_dir / "nxdt_run_id")
        evil = craft_metadata_payload(base_ckpt, run_dir / "checkpoints" / STEP2, canary)
        extra = ["exp_manager.resume_if_exists=true"]
    else:
        evil = craft_metadata_payload(base_ckpt, tmp_path / "evil", canary)
        extra = [f"exp_manager.resume_from_checkpoint={evil}"]
        extra += ["model.weight_init_only=true"] if how == "weight_init_only" else []
    with pytest.raises(NxdtError, match=r"refusing checkpoint metadata .*/\.metadata: it asks to load posix\.system"):
        single_trainer([*tiny(2, 3), *data_overrides, *extra], run_dir).fit()
    assert not canary.exists()


def test_pickled_items_and_shards_are_refused(tmp_path):
    """Clean metadata that declares a pickled (bytes) item, and a shard that is a pickle: both refused, nothing runs.

    DCP reads bytes items with torch.load(weights_only=False); nxdt saves tensors only.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from nxdt.checkpoint.dcp_io import load_model_tensors

    canary = tmp_path / "canary"
    ckpt = tmp_path / "ckpt"
    dcp.save({"model": {"w": torch.ones(4)}}, checkpoint_id=str(ckpt), no_dist=True)
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: safe to unpickle here
    meta.state_dict_metadata["model.w"] = BytesStorageMetadata()
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(NxdtError, match=r"'model.w' is a pickled object, and nxdt checkpoints hold tensors only"):
        load_model_tensors(Store(str(tmp_path)), "ckpt")

    shard = tmp_path / "shard"
    dcp.save({"model": {"w": torch.ones(4)}}, checkpoint_id=str(shard), no_dist=True)
    (distcp,) = shard.glob("*.distcp")
    meta = pickle.loads((shard / ".metadata").read_bytes())
    torch.save(Payload(canary), distcp)
    for info in meta.storage_data.values():
        info.offset, info.length = 0, distcp.stat().st_size
    (shard / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(NxdtError, match=rf"refusing checkpoint file {shard}/{distcp.name}: not a plain tensor file"):
        load_model_tensors(Store(str(tmp_path)), "shard")
    assert not canary.exists()


def test_s3_resume_refuses_a_pickle_payload(base_ckpt, tmp_path, data_overrides, s3_env, monkeypatch):
    """The same crafted checkpoint on s3:// is refused by name; the payload never runs."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    canary = tmp_path / "canary"
    evil = craft_metadata_payload(base_ckpt, tmp_path / "evil", canary)
    store = Store("s3://hostile/crafted")
    for path in evil.iterdir():
        store.fs.put_file(str(path), f"{store.base}/ck/{path.name}")
    with pytest.raises(NxdtError, match=r"refusing checkpoint metadata s3://hostile/crafted/ck/\.metadata"):
        single_trainer([*tiny(2, 3), *data_overrides, "exp_manager.resume_from_checkpoint=s3://hostile/crafted/ck"],
                       tmp_path / "run").fit()
    assert not canary.exists()


# -- ownership, retention and replacing a checkpoint ------------------------------------------
@pytest.mark.slow
def test_shared_checkpoint_dir_keeps_what_is_not_the_runs(base, base_ckpt, tmp_path, data_overrides):
    """Keep-last-1 in a shared checkpoint_dir deletes only the run's own checkpoints; auto-resume ignores others'.

    The directory holds a user folder named like a checkpoint, another run's complete checkpoint at a
    higher step (named by the same template) and an incomplete directory of unknown origin.
    """
    shared = tmp_path / "shared"
    (shared / "my_notes_step=1").mkdir(parents=True)
    (shared / "my_notes_step=1" / "notes.txt").write_text("mine")
    foreign = shared / "nxdt--step=8-consumed_samples=64"
    shutil.copytree(base_ckpt, foreign)
    rewrite_marker(foreign, step=8, consumed_samples=64, run_id="someone-else")
    (shared / "nxdt--step=3-consumed_samples=24").mkdir()
    (shared / "nxdt--step=3-consumed_samples=24" / "__0_0.distcp").write_bytes(b"partial")
    before = sorted(str(p.relative_to(shared)) for p in shared.rglob("*"))

    run = [*tiny(2, 2), *data_overrides, f"exp_manager.checkpoint_dir={shared}", "exp_manager.resume_if_exists=true",
           "exp_manager.resume_ignore_no_checkpoint=true", "exp_manager.checkpoint_callback_params.every_n_train_steps=1"]
    result = single_trainer(run, tmp_path / "a").fit()
    assert len(result.losses) == 2  # started at step 0, not from the other run's step 8
    after = sorted(str(p.relative_to(shared)) for p in shared.rglob("*"))
    assert set(before) <= set(after)
    run_id = (tmp_path / "a" / "nxdt_run_id").read_text().strip()
    mine = [(i.name, i.complete) for i in list_checkpoints(Store(str(shared))) if i.run_id == run_id]
    assert mine == [("nxdt--step=2-consumed_samples=16", True)]  # its step 1 went, nothing else did

    # A second run on the same directory and template must not replace the first one's step 2.
    with pytest.raises(NxdtError, match=r"nxdt--step=2-consumed_samples=16 already exists and is not this run's"):
        single_trainer(run, tmp_path / "b").fit()
    assert inspect_marker(Store(str(shared)), "nxdt--step=2-consumed_samples=16")[0]["run_id"] == run_id


@pytest.mark.slow
def test_fixed_name_survives_a_crash_during_the_swap(tmp_path, data_overrides, monkeypatch):
    """filename=latest: the save of step 2 is staged, and a crash between the two renames of the swap
    still leaves complete checkpoints; the re-run resumes from step 2 and ends with `latest` alone."""
    run = [*tiny(2, 3), *data_overrides, "exp_manager.checkpoint_callback_params.filename=latest",
           "exp_manager.checkpoint_callback_params.every_n_train_steps=1", "exp_manager.resume_if_exists=true",
           "exp_manager.resume_ignore_no_checkpoint=true"]
    renames: list[tuple[str, str]] = []
    original = Store.rename

    def crash_on_second_rename(self, name, new_name, last=None):
        renames.append((name, new_name))
        if len(renames) == 2:
            raise OSError("simulated crash between the renames")
        return original(self, name, new_name, last)

    monkeypatch.setattr(Store, "rename", crash_on_second_rename)
    with pytest.raises(NxdtError, match="simulated crash"):
        single_trainer(run, tmp_path).fit()
    monkeypatch.undo()
    store = Store(str(tmp_path / "checkpoints"))
    assert renames[0] == ("latest", "latest.nxdt-old-1")
    assert {i.name: (i.complete, i.step) for i in list_checkpoints(store)} == {
        "latest.nxdt-old-1": (True, 1), "latest.nxdt-staging-2": (True, 2)}
    assert latest_complete(store).name == "latest.nxdt-staging-2"
    result = single_trainer(run, tmp_path).fit()
    assert len(result.losses) == 1  # step 3 only
    assert {i.name: (i.complete, i.step) for i in list_checkpoints(store)} == {"latest": (True, 3)}


# -- malformed markers ------------------------------------------------------------------------
MALFORMED = [
    '{"format": "nxdt-dcp-1", "step": 9, "consumed_samples": 72, "files": {}}',
    "not json at all {",
    '["a", "list"]',
    '{"format": "nxdt-dcp-1", "step": "9", "consumed_samples": 72, "files": {".metadata": {"size": 1, "sha256": "x"}}}',
]


@pytest.mark.slow
def test_malformed_markers_mean_incomplete(base, base_ckpt, tmp_path, data_overrides, capsys):
    """Malformed markers ({"files": {}}, not JSON, a list, wrong types) are a warning each and incomplete
    checkpoints: the listing works, and auto-resume skips them for the run's good step-2 checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    bad = []
    for i, marker in enumerate(MALFORMED):
        bad.append(run_dir / "checkpoints" / f"nxdt--step={9 + i}-consumed_samples={72 + 8 * i}")
        shutil.copytree(base_ckpt, bad[-1])
        (bad[-1] / MARKER).write_text(marker)
        (bad[-1] / "__0_0.distcp").write_bytes(b"corrupted")
    assert main(["checkpoints", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert all(f"checkpoint {b} is skipped as incomplete" in err for b in bad), err
    assert [i.name for i in list_checkpoints(Store(str(run_dir / "checkpoints"))) if i.complete] == [STEP2]
    result = single_trainer([*tiny(2, 3), *data_overrides, "exp_manager.resume_if_exists=true"], run_dir).fit()
    assert len(result.losses) == 1  # resumed from step 2, not from a malformed later one


def test_a_shard_the_marker_does_not_list_is_refused(base_ckpt, tmp_path, capsys):
    """A marker that leaves a shard out (so nothing would verify it) does not let that shard load."""
    ckpt = tmp_path / "ck"
    shutil.copytree(base_ckpt, ckpt)
    marker = json.loads((ckpt / MARKER).read_text())
    del marker["files"]["__0_0.distcp"]
    (ckpt / MARKER).write_text(json.dumps(marker))
    assert main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf")]) == 1
    assert "not covered by its marker" in one_line(capsys.readouterr().err)


# -- config-time checks -----------------------------------------------------------------------
@pytest.mark.parametrize("template, expected", [
    ("{val_loss:.2f}-{step}", "{val_loss} is not available"),
    ("../escape-{step}", "may not contain '/', '\\' or '..'"),
    ("a/b-{step}", "may not contain '/'"),
    ("run-{step:q}", "not a valid format"),
])
def test_bad_filename_templates_fail_dry_run_and_config_validate(tmp_path, capsys, template, expected):
    """Templates are checked with the config: `run --dry-run` and `config validate` fail with one line."""
    key = f"exp_manager.checkpoint_callback_params.filename='{template}'"  # quoted, as YAML needs for braces
    assert main(["run", "llama3-tiny", "--dry-run", key]) == 2
    line = one_line(capsys.readouterr().err)
    assert "exp_manager.checkpoint_callback_params.filename" in line and expected in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {max_steps: 2}\n")
    assert main(["config", "validate", str(cfg), key]) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_model_mismatch_is_a_short_list(base_ckpt, tmp_path, data_overrides, capsys):
    """Resuming into another hidden size names the differing tensors and shapes in one line, no traceback."""
    args = ["run", "llama3-tiny", *tiny(2, 3, "model.hidden_size=128"), *data_overrides,
            f"exp_manager.resume_from_checkpoint={base_ckpt}", f"exp_manager.explicit_log_dir={tmp_path}"]
    assert main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert "does not fit this model" in line and "63 tensors differ" in line, line
    assert "model.layers.0.attention.wq.weight: checkpoint [64, 64], model [128, 128]" in line and len(line) < 700


@pytest.mark.slow
def test_interpolation_bomb_is_refused_with_bounded_memory(tmp_path):
    """Under 600 bytes of nested ${...} (and a YAML alias bomb) that would build gigabytes: refused at
    once, the process staying small."""
    doc, prev = ["a: 'xxxxxxxx'"], "a"
    for i in range(1, 11):  # each level repeats the previous one 8 times: 8 x 8^10 characters in the end
        doc.append(f"b{i}: '" + ("${" + prev + "}") * 8 + "'")
        prev = f"b{i}"
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(doc) + "\n")
    assert bomb.stat().st_size < 600
    laughs = tmp_path / "laughs.yaml"
    rows = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    laughs.write_text("\n".join(rows) + "\n")
    code = ("import resource, sys; from nxdt.cli.main import main; "
            "codes = [main(['config', 'validate', f]) for f in sys.argv[1:]]; "
            "print(codes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code, str(bomb), str(laughs)], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert res.stdout.split("]")[0] == "[2, 2", res.stdout + res.stderr
    bomb_err, laughs_err = [line for line in res.stderr.splitlines() if line.strip()]
    assert "interpolation would expand" in bomb_err and f"{laughs}: YAML anchors and aliases expand" in laughs_err
    max_rss_mib = int(res.stdout.split()[-1]) / 1024
    print(f"interpolation bomb of {bomb.stat().st_size} bytes: refused with max RSS {max_rss_mib:.0f} MiB")
    assert max_rss_mib < 1024


def test_binary_text_data_is_refused_by_name(tmp_path, capsys):
    """A binary file named .txt (and a non-UTF-8 .jsonl) is refused with the file's name."""
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(b"some text\n" + bytes(range(256)) * 4)
    args = ["run", "llama3-tiny", "--recipe", "pretrain", *tiny(2, 1), f"data.train_dir={binary}",
            f"exp_manager.explicit_log_dir={tmp_path / 'run'}"]
    assert main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert str(binary) in line and "binary or non-UTF-8 data" in line
    from nxdt.data.bad_rows import BadRowReport
    from nxdt.data.records import iter_jsonl

    latin = tmp_path / "rows.jsonl"
    latin.write_bytes('{"input": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(NxdtError, match=rf"{latin}: binary or non-UTF-8 data \(byte 0xe9\)"):
        list(iter_jsonl(latin, BadRowReport()))


# -- metrics.jsonl ----------------------------------------------------------------------------
def test_metrics_jsonl_cuts_partial_lines_and_rewinds(tmp_path):
    """A line cut by a crash is removed at the next open; rewinding keeps each step once."""
    from nxdt.train.exp_manager import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.rewind(1)
    logger.log(2, {"loss": 0.8})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8}]


# -- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs (a real ENOSPC); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_keeps_the_last_checkpoint_and_parseable_metrics(small_fs, data_overrides):
    """An async save that fills the disk: one line with the directory and "no space left", the step-1
    checkpoint kept complete and verifiable, metrics.jsonl whole lines only."""
    run_dir = small_fs / "run"
    args = ["run", "llama3-tiny", *tiny(2, 6, "trainer.log_every_n_steps=1"), *data_overrides,
            f"exp_manager.explicit_log_dir={run_dir}", "exp_manager.async_checkpointing=true",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=1", "exp_manager.create_tensorboard_logger=false"]
    res = subprocess.run([sys.executable, "-m", "nxdt.cli.main", *args], capture_output=True, text=True, env=ENV, timeout=240)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    line = one_line(res.stderr)
    assert "no space left" in line and str(small_fs) in line, line
    store = Store(str(run_dir / "checkpoints"))
    good = latest_complete(store)
    assert good is not None and [i.name for i in list_checkpoints(store)] == [good.name]
    from nxdt.checkpoint.layout import verify_files

    assert verify_files(store, good.name, good.marker) == []
    rows = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    print(f"disk full: {line}")


# -- which rank a failed job names --------------------------------------------------------------
def test_job_failure_names_the_first_failing_rank(tmp_path):
    """The launcher's line names the rank that failed first by time (not the smallest rank), prefers a
    rank's own error over ones that only follow from it, and exits with that rank's code."""
    from types import SimpleNamespace

    from nxdt.cli.run_command import Watchdog, job_failure

    def report(rank: int, when: float, message: str, code: int, secondary: bool = False) -> None:
        record = {"rank": rank, "time": when, "message": message, "exit_code": code, "secondary": secondary}
        (tmp_path / f"rank{rank}.error.json").write_text(json.dumps(record))

    def death(code: int, when: int) -> SimpleNamespace:
        return SimpleNamespace(exitcode=code, timestamp=when, pid=4242)

    watchdog = Watchdog(str(tmp_path), 10)
    report(0, 101.0, "a collective timed out", 1, secondary=True)
    report(3, 100.5, "lost the connection to another rank", 1, secondary=True)
    failures = {0: death(1, 101), 2: death(-9, 100), 3: death(1, 100)}
    err = job_failure(failures, str(tmp_path), watchdog)
    assert str(err) == "rank 2 (pid 4242) was killed by SIGKILL" and err.exit_code == 137
    # Rank 1 aborts and the launcher then stops rank 0 with SIGTERM, in the same second: rank 1 is named.
    aborted = job_failure({0: death(-15, 100), 1: death(-6, 100)}, str(tmp_path / "none"), watchdog)
    assert str(aborted) == "rank 1 (pid 4242) was killed by SIGABRT" and aborted.exit_code == 134
    report(1, 100.2, "disk is on fire", 5)
    err = job_failure(failures, str(tmp_path), watchdog)
    assert str(err) == "rank 1: disk is on fire" and err.exit_code == 5
