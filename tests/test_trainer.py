"""The shared training loop and its utilities: config parsing, checkpoints, data order, and the rules that keep
runs apart (folder reuse, the lock, changed settings on resume, records that describe the weights beside them).

Whole runs use training/train_vae.py with the tiny config, in-process (a second or two each)."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from nanoi2v_diffusers.cpu_malloc import environment_without_malloc_settings
from nanoi2v_diffusers.data.sampling import EpochDataset, ResumableSampler
from nanoi2v_diffusers.settings import parse_config
from nanoi2v_diffusers.training import trainer
from nanoi2v_diffusers.training.trainer import (
    CONFIG_FILE,
    LOCK_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    TRAIN_LOG,
    RunFolderError,
    RunLock,
    TrainingConfig,
    append_jsonl,
    build_dataset,
    checkpoint_step,
    drop_records_after_step,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    save_config,
)


@dataclass
class ExampleConfig(TrainingConfig):
    widths: Tuple[int, ...] = (8, 16)
    guidance: Optional[float] = None


def write_yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_flags(tmp_path):
    config_file = write_yaml(tmp_path, "learning_rate: 1e-3\nmax_train_steps: 7\nwidths: [4, 4]\ngradient_checkpointing: true\n")
    config = parse_config(ExampleConfig, ["--config", config_file, "--max_train_steps", "9", "--no-gradient_checkpointing"])
    assert config.learning_rate == 1e-3  # PyYAML reads "1e-3" as a string; it is coerced to float
    assert config.max_train_steps == 9  # the flag wins over the file
    assert config.widths == (4, 4)
    assert config.gradient_checkpointing is False
    assert config.train_batch_size == TrainingConfig.train_batch_size  # untouched default


def test_flags_cover_every_field_and_optional_values():
    config = parse_config(ExampleConfig, ["--widths", "1", "2", "3", "--guidance", "2.5", "--checkpoints_total_limit", "none"])
    assert config.widths == (1, 2, 3) and config.guidance == 2.5 and config.checkpoints_total_limit is None


def test_unknown_yaml_key_raises_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'learning_rat'.*Did you mean 'learning_rate'"):
        parse_config(ExampleConfig, ["--config", write_yaml(tmp_path, "learning_rat: 0.1\n")])


def test_yaml_base_file_is_read_first_and_overridden(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "first.yaml").write_text("learning_rate: 1e-3\nmax_train_steps: 7\nwidths: [4, 4]\n")
    (tmp_path / "stages" / "second.yaml").write_text("base: ../first.yaml\nmax_train_steps: 9\n")  # relative to itself
    (tmp_path / "stages" / "third.yaml").write_text("base: second.yaml\nwidths: [2]\n")
    config = parse_config(ExampleConfig, ["--config", str(tmp_path / "stages" / "third.yaml"), "--learning_rate", "0.5"])
    assert (config.learning_rate, config.max_train_steps, config.widths) == (0.5, 9, (2,))


def test_yaml_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="`base` files form a cycle"):
        parse_config(ExampleConfig, ["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "b.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="b.yaml: unknown setting 'learning_rat'"):
        parse_config(ExampleConfig, ["--config", str(tmp_path / "a.yaml")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mixed_precision", "fp8"], "mixed_precision must be one of"),
        (["--dataset", "video_folder"], "needs train_data_dir"),
        (["--max_train_steps", "0"], "max_train_steps must be >= 1"),
        (["--shapes_max_objects", "4"], "max_objects <= 3"),
    ],
)
def test_invalid_settings_raise(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(ExampleConfig, argv)


def test_save_config_round_trips(tmp_path):
    config = parse_config(ExampleConfig, ["--learning_rate", "0.25", "--widths", "3"])
    path = save_config(config, tmp_path)
    assert parse_config(ExampleConfig, ["--config", str(path)]) == config


def test_checkpoint_rotation_and_latest(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    assert resolve_checkpoint(tmp_path, "latest") is None  # nothing to resume: fresh start
    for step in (5, 10, 15):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [checkpoint_step(path) for path in list_checkpoints(tmp_path)] == [10, 15]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-15"
    assert resolve_checkpoint(tmp_path, "checkpoint-10") == tmp_path / "checkpoint-10"
    assert resolve_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="neither 'latest' nor a checkpoint folder"):
        resolve_checkpoint(tmp_path, "checkpoint-99")


def test_drop_records_after_step_keeps_the_checkpointed_steps_only(tmp_path):
    log = tmp_path / "train_log.jsonl"
    assert drop_records_after_step(log, 3) == 0 and not log.exists()  # no log yet: nothing to do
    for step in range(1, 6):
        append_jsonl(log, {"step": step, "loss": 1.0 / step})
    append_jsonl(log, {"step": 5, "summary": {"steps": 5}})
    with log.open("a") as handle:
        handle.write('{"step": 6, "lo')  # a record torn by a kill mid-write
    assert drop_records_after_step(log, 3) == 4  # steps 4 and 5, the summary, the torn line
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert drop_records_after_step(log, 3) == 0
    assert not list(tmp_path.glob(".*"))  # no partial file left behind


class _EpochRecorder(torch.utils.data.Dataset):
    """Items are (epoch the item was loaded in, index): what a dataset with per-epoch augmentation sees."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return (self.epoch, index)


@pytest.mark.parametrize("workers", [0, 1])
def test_each_item_is_loaded_in_its_own_epoch_also_in_a_worker(workers):
    """Random flips are drawn per (seed, epoch, index): a DataLoader worker must know each item's epoch."""
    dataset = EpochDataset(torch.utils.data.Subset(_EpochRecorder(), range(3)))
    sampler = ResumableSampler(len(dataset), seed=1, start=2, with_epoch=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                                         collate_fn=lambda items: items[0])  # fmt: skip
    items = [item for item, _ in zip(loader, range(5))]
    expected = [(position // 3, int(sampler.epoch_order(position // 3)[position % 3])) for position in range(2, 7)]
    assert items == expected


def test_shapes_data_has_the_configured_clips():
    config = ExampleConfig(resolution=32, num_frames=5, train_batch_size=2, num_validation_samples=3)
    assert len(build_dataset(config, "validation")) == 3
    assert build_dataset(config, "train")[0]["pixel_values"].shape == (3, 5, 32, 32)


def test_shapes_object_counts_reach_both_splits():
    config = ExampleConfig(resolution=32, num_frames=5, num_validation_samples=6, shapes_min_objects=3,
                           shapes_max_objects=3)  # fmt: skip
    for split in ("train", "validation"):
        dataset = build_dataset(config, split)
        assert {len(dataset.clip(index).objects) for index in range(6)} == {3}, split
    assert {len(build_dataset(ExampleConfig(), "train").clip(index).objects) for index in range(40)} == {1, 2}


# Allocates and touches a 20 MiB tensor, frees it, and prints how many MiB the process's resident set shrank by.
_FREED_MEMORY_SCRIPT = """
import os, sys, torch
from nanoi2v_diffusers.cpu_malloc import keep_freed_cpu_memory
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
kept = keep_freed_cpu_memory() if sys.argv[1] == "keep" else None
block = torch.ones(20 * 2**20 // 4)
before = resident_mib()
del block
print(kept, before - resident_mib())
"""


def _run_freed_memory_script(mode: str, **env: str):
    result = subprocess.run(
        [sys.executable, "-c", _FREED_MEMORY_SCRIPT, mode], env={**environment_without_malloc_settings(), **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    kept, released_mib = result.stdout.split()
    return kept, float(released_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_cpu_memory_keeps_a_freed_block_for_reuse():
    # By default glibc maps a fresh 20 MiB block from the OS and unmaps it when freed; kept, it stays in the
    # heap for the next step's tensors (no page faults to bring it back).
    _, released_by_default = _run_freed_memory_script("default")
    kept, released_when_kept = _run_freed_memory_script("keep")
    assert released_by_default > 15
    assert kept == "True" and released_when_kept < 5
    # The user's own malloc settings win: nothing is changed.
    for user_setting in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        kept, released = _run_freed_memory_script("keep", **user_setting)
        assert kept == "False" and released > 15, user_setting


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="trains on the accelerator")
def test_build_accelerator_keeps_freed_memory_when_training_on_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "keep_freed_cpu_memory", lambda: calls.append("kept") or True)
    accelerator = trainer.build_accelerator(TrainingConfig(output_dir=str(tmp_path), report_to="none"))
    assert accelerator.device.type == "cpu" and calls == ["kept"]


# ------------------------------------------------------------------------------------------- runs that never mix

VAE_TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "vae_tiny.yaml"


def _vae_run(out, *extra: str) -> dict:
    from nanoi2v_diffusers.training import train_vae

    return train_vae.main(["--config", str(VAE_TINY), "--output_dir", str(out), "--max_train_steps", "4",
                           "--checkpointing_steps", "2", "--validation_steps", "100", "--num_validation_samples", "1",
                           *extra])  # fmt: skip


def _log_records(out) -> list:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def test_a_fresh_run_refuses_a_folder_holding_another_run_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "run"
    _vae_run(out)
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match=f"output_dir {out} holds another run .*checkpoint-4.*--overwrite_output_dir"):
        _vae_run(out, "--seed", "1")
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before  # nothing was touched

    (out / "checkpoint-9").mkdir()  # a checkpoint the new run would never reach: it must not survive either
    _vae_run(out, "--seed", "1", "--overwrite_output_dir")
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-4"]  # vae_tiny keeps one checkpoint
    steps = [record["step"] for record in _log_records(out) if "loss" in record]
    assert steps == [1, 2, 3, 4]  # the old run's records are gone, not mixed in
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() != before
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["seed"] == 1
    with pytest.raises(ValueError, match="exclude each other"):
        _vae_run(out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")


def test_a_second_process_is_locked_out_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = RunLock(out)
    assert holder.acquire() is None  # another "process": its own open file, so flock refuses a second taker
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another training run \(pid {os.getpid()} on .*since"):
            _vae_run(out)
        assert not (out / TRAIN_LOG).exists() and not list_checkpoints(out)
    finally:
        holder.release()
    # A killed run leaves its lock file behind but not the lock: the next run takes it over.
    (out / LOCK_FILE).write_text("pid 999999 on elsewhere, since 2026-01-01 00:00:00\n")
    _vae_run(out)
    assert (out / SUMMARY_FILE).is_file() and (out / LOCK_FILE).read_text() == ""  # released at the end


def test_a_resume_with_changed_settings_stops_and_the_opt_in_makes_them_take_effect(tmp_path):
    out = tmp_path / "run"
    _vae_run(out, "--max_train_steps", "2")
    saved = (out / CONFIG_FILE).read_text()
    changed = ("--max_train_steps", "4", "--learning_rate", "0.5", "--train_batch_size", "3")
    with pytest.raises(RunFolderError, match=r"other settings than this run's \(max_train_steps: 2 -> 4; "
                                             r"train_batch_size: 2 -> 3; learning_rate: 0\.002 -> 0\.5\)"):
        _vae_run(out, *changed, "--resume_from_checkpoint", "latest")
    assert (out / CONFIG_FILE).read_text() == saved  # a run that failed at start-up rewrote no record

    _vae_run(out, *changed, "--resume_from_checkpoint", "latest", "--allow_changed_settings")
    records = _log_records(out)
    resumed = next(record for record in records if "resumed_from" in record)
    assert resumed["changed_settings"]["learning_rate"] == [0.002, 0.5]
    assert [record["lr"] for record in records if record.get("step", 0) > 2 and "loss" in record] == [0.5, 0.5]
    recorded = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert (recorded["learning_rate"], recorded["train_batch_size"], recorded["max_train_steps"]) == (0.5, 3, 4)
    state = json.loads((out / "checkpoint-4" / STATE_FILE).read_text())
    assert state["samples_seen"] == 2 * 2 + 2 * 3  # two steps of 2 clips, then two of 3: the new batch size ran
    assert json.loads((out / SUMMARY_FILE).read_text())["steps"] == 4


def test_a_resumed_vae_run_is_bit_exact_and_its_summary_covers_the_whole_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    summary = _vae_run(full, "--max_train_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "none")
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(full / TRAIN_LOG, resumed / TRAIN_LOG)  # as if the run died after step 6 with only checkpoint-3
    resumed_summary = _vae_run(resumed, "--max_train_steps", "6", "--checkpointing_steps", "3",
                               "--checkpoints_total_limit", "none", "--resume_from_checkpoint", "latest")  # fmt: skip

    losses = {name: {r["step"]: r["loss"] for r in _log_records(run) if "loss" in r} for name, run in
              (("full", full), ("resumed", resumed))}  # fmt: skip
    assert losses["resumed"] == losses["full"] and sorted(losses["full"]) == [1, 2, 3, 4, 5, 6]
    for name in ("steps", "final_loss", "mean_loss_last_100_steps"):  # over all six steps, not the last three
        assert resumed_summary[name] == summary[name], name
    expected = load_file(str(full / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(trained[name], value) for name, value in expected.items())


def test_ema_shadow_weights_follow_the_model_to_its_device_on_resume(tmp_path, monkeypatch):
    """accelerate loads the EMA state on the CPU; on a GPU the next EMA step then mixed devices."""
    from diffusers.training_utils import EMAModel

    moved = []
    original_to = EMAModel.to
    monkeypatch.setattr(EMAModel, "to", lambda self, *args, **kwargs: moved.append(kwargs.get("device", args[0] if args else None))
                        or original_to(self, *args, **kwargs))  # fmt: skip
    out = tmp_path / "run"
    _vae_run(out, "--use_ema", "--max_train_steps", "2")
    assert moved == []
    _vae_run(out, "--use_ema", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert [str(device) for device in moved] == ["cpu"]  # the accelerator's device, whatever it is


def test_missing_local_paths_are_reported_at_once(tmp_path, monkeypatch):
    from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig

    with pytest.raises(ValueError, match=f"pretrained_vae: no such folder '{tmp_path}/vae'"):
        DiTTrainingConfig(pretrained_vae=str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="text_encoder: no such folder 'user/encoder'.*a local folder is needed"):
        DiTTrainingConfig(text_encoder="user/encoder")  # the text encoder loads from local folders only
    DiTTrainingConfig(pretrained_vae="user/vae")  # a Hub id is the Hub's (or its cache's) to resolve
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ValueError, match="pretrained_transformer: no such folder 'outputs/dit'"):
        DiTTrainingConfig(pretrained_transformer="outputs/dit")  # outputs/ is a local folder: not a Hub namespace
