"""Faults (issue 8): unreadable dataset files, crashes during checkpoint writes and deletes, and a training
run killed with SIGKILL at random points that resumes with the losses of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file
from test_video_io import write_audio_only
from training_fixtures import assets, fresh_accelerator_state, single_thread, tiny_dit_argv  # noqa: F401

from nanoi2v_diffusers.data import ShapesConfig, VideoFolderDataset, write_shapes_folder
from nanoi2v_diffusers.training import train_dit, train_vae, trainer
from nanoi2v_diffusers.training.trainer import (
    PARTIAL_CHECKPOINT_PREFIX,
    TrainingConfig,
    build_dataset,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "training" / "train_dit.py"
TINY_CONFIG = REPO / "training" / "configs" / "tiny.yaml"
VAE_TINY_CONFIG = REPO / "training" / "configs" / "vae_tiny.yaml"
CLIPS = ShapesConfig(canvas_size=32, num_frames=5)
SIZE = dict(num_frames=5, height=32, width=32)
# The killed run: enough steps that a random kill lands in training, a checkpoint after every step so that
# many kills land inside a checkpoint write, and three checkpoints kept so that rotation deletes run too.
KILL_RUN_STEPS = 16
KILL_RUN_ARGS = ("--max_train_steps", str(KILL_RUN_STEPS), "--checkpointing_steps", "1", "--checkpoints_total_limit", "3",
                 "--validation_steps", "1000")  # fmt: skip
# (how to pick the moment, seed): "step" kills a random time after a random step was logged; "write" kills
# as soon as a checkpoint write has started.
KILLS = (("step", 11), ("write", 12), ("step", 13))
POLL_SECONDS = 0.001
LAUNCH_TIMEOUT_SECONDS = 120


_argv = tiny_dit_argv


def _records(output_dir: Path) -> list:
    path = output_dir / train_dit.TRAIN_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _break(path: Path) -> None:
    path.write_bytes(b"not a video" * 100)


# ------------------------------------------------------------------------------------------- dataset files


def test_audio_only_file_is_skipped_and_counted(tmp_path):
    folder = write_shapes_folder(tmp_path, 3, config=CLIPS)
    write_audio_only(folder / "clip_00001.mp4")
    dataset = VideoFolderDataset(folder, **SIZE)
    assert [dataset[index]["file_name"] for index in range(3)] == ["clip_00000.mp4", "clip_00002.mp4", "clip_00002.mp4"]
    assert dataset.bad_files == ["clip_00001.mp4"]


def test_training_config_sets_the_bad_file_fraction(tmp_path):
    folder = write_shapes_folder(tmp_path, 4, config=CLIPS)
    config = TrainingConfig(dataset="video_folder", train_data_dir=str(folder), max_bad_fraction=0.3, resolution=32,
                            num_frames=5)  # fmt: skip
    assert build_dataset(config).max_bad_fraction == 0.3
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        TrainingConfig(max_bad_fraction=1.5)


def test_training_reports_skipped_files_and_aborts_past_the_fraction(tmp_path, assets):
    folder = write_shapes_folder(tmp_path / "videos", 4, config=CLIPS)
    _break(folder / "clip_00002.mp4")
    data = ("--dataset", "video_folder", "--train_data_dir", str(folder), "--max_train_steps", "2",
            "--validation_steps", "100", "--checkpointing_steps", "100", "--num_validation_samples", "2")  # fmt: skip
    summary = train_dit.main(_argv(tmp_path / "run", assets, *data))
    assert summary["num_bad_video_files"] == 1  # 2 steps x 2 clips: one epoch, so every file was tried
    assert _records(tmp_path / "run")[-1]["summary"]["num_bad_video_files"] == 1

    _break(folder / "clip_00003.mp4")
    with pytest.raises(RuntimeError, match=r"could not be decoded, more than max_bad_fraction=0.25"):
        train_dit.main(_argv(tmp_path / "strict", assets, *data, "--max_bad_fraction", "0.25"))


# ------------------------------------------------------------------------------------------- non-finite steps


def test_vae_training_skips_nonfinite_steps_and_stops_a_streak_after_a_checkpoint(tmp_path, monkeypatch):
    """(train_dit's counterpart: tests/test_train_dit.py::test_nonfinite_steps_are_skipped_and_a_streak_stops...)"""
    original, calls, bad_calls = train_vae.VAEWithPosterior.forward, [0], {2} | set(range(4, 100))

    def sometimes_nan(self, pixels, generator=None):
        calls[0] += 1
        reconstruction, kl = original(self, pixels, generator)
        return (reconstruction * float("inf"), kl) if calls[0] in bad_calls else (reconstruction, kl)

    monkeypatch.setattr(train_vae.VAEWithPosterior, "forward", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLossError, match="max_nonfinite_steps=2"):
        train_vae.main(["--config", str(VAE_TINY_CONFIG), "--output_dir", str(out), "--max_train_steps", "8",
                        "--checkpointing_steps", "3", "--checkpoints_total_limit", "none", "--validation_steps", "100",
                        "--max_nonfinite_steps", "2"])  # fmt: skip
    skipped = [record["step"] for record in _records(out) if record.get("skipped")]
    assert skipped == [2, 4, 5]  # steps 4 and 5 fail in a row: the run stops at step 5
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-5"]
    stopped, before = (load_file(str(out / name / "model.safetensors")) for name in ("checkpoint-5", "checkpoint-3"))
    for name, value in stopped.items():  # the skipped updates left the weights finite and untouched
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


# ------------------------------------------------------------------------------------------- checkpoint deletes


def test_crash_while_deleting_an_old_checkpoint_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    real_rmtree = trainer.shutil.rmtree

    def crash_on_stale(path, *args, **kwargs):
        if Path(path).name.startswith(trainer.STALE_CHECKPOINT_PREFIX) and not kwargs.get("ignore_errors"):
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(trainer.shutil, "rmtree", crash_on_stale)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 3, total_limit=2)  # rotation deletes checkpoint-1
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / ".stale-checkpoint-1").is_dir()  # hidden, never listed
    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, 4, total_limit=2)
    assert not list(tmp_path.glob(".stale-*")) and not list(tmp_path.glob(f"{PARTIAL_CHECKPOINT_PREFIX}*"))


# ------------------------------------------------------------------------------------------- kill -9


def _assert_complete(checkpoint: Path) -> None:
    """Every file `accelerator.load_state` reads is there and parses."""
    assert checkpoint.name.startswith(trainer.CHECKPOINT_PREFIX), checkpoint
    assert load_file(str(checkpoint / "model.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"):
        torch.load(checkpoint / name, weights_only=True)
    accelerate_load(checkpoint / "random_states_0.pkl")  # numpy RNG states need accelerate's allow-list


def _launch(argv: list, stderr_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(stderr_path, "ab") as stderr:
        return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, cwd=REPO)  # fmt: skip


def _wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def _kill_once(out: Path, argv: list, how: str, seed: int, stderr_path: Path) -> None:
    rng = random.Random(seed)
    latest = resolve_checkpoint(out, "latest")
    resumed_at = trainer.checkpoint_step(latest) if latest else 0
    already_logged = len(_records(out))
    process = _launch([*argv, "--resume_from_checkpoint", "latest"], stderr_path)
    if how == "step":
        target = resumed_at + rng.randint(2, 4)
        logged = lambda: any(r.get("step", 0) >= target for r in _records(out)[already_logged:])  # noqa: E731
        _wait_until(logged, process, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.05))
    else:
        first_new = resumed_at + rng.randint(1, 3)
        writing = lambda: any(  # noqa: E731
            entry.name.startswith(PARTIAL_CHECKPOINT_PREFIX) and int(entry.name.rsplit("-", 1)[1]) >= first_new
            for entry in os.scandir(out)
        )
        _wait_until(writing, process, f"a checkpoint write after step {first_new}")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # it was still running: the kill interrupted it
    if how == "write":  # the write it interrupted is left behind, hidden
        assert list(out.glob(f"{PARTIAL_CHECKPOINT_PREFIX}*"))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, assets):
    reference_dir = tmp_path / "reference"
    train_dit.main(_argv(reference_dir, assets, *KILL_RUN_ARGS))
    reference = {r["step"]: r["loss"] for r in _records(reference_dir) if "loss" in r}

    out, stderr_path = tmp_path / "killed", tmp_path / "killed-stderr.txt"
    argv = _argv(out, assets, *KILL_RUN_ARGS)
    for how, seed in KILLS:
        _kill_once(out, argv, how, seed, stderr_path)
        latest = resolve_checkpoint(out, "latest")
        assert latest is not None and latest.parent == out
        _assert_complete(latest)  # whatever the kill interrupted, "latest" is a whole checkpoint

    final = _launch([*argv, "--resume_from_checkpoint", "latest"], stderr_path)
    assert final.wait(LAUNCH_TIMEOUT_SECONDS) == 0, stderr_path.read_text()[-3000:]

    records = _records(out)
    assert records[-1]["summary"]["steps"] == KILL_RUN_STEPS
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert sorted(step for step, _ in losses) == list(range(1, KILL_RUN_STEPS + 1))  # each step logged once
    # Every step logged, before or after a kill, has the uninterrupted run's loss exactly.
    assert all(loss == reference[step] for step, loss in losses), [(s, l, reference[s]) for s, l in losses]
    trained, expected = (load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
                         for d in (out, reference_dir))  # fmt: skip
    assert all(torch.equal(trained[name], value) for name, value in expected.items())
    assert [c.name for c in list_checkpoints(out)][-1] == f"checkpoint-{KILL_RUN_STEPS}"
