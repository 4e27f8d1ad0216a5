"""The shared training utilities: config parsing, checkpoint rotation and resolution, data."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from accelerate import Accelerator

from nanoi2v_diffusers.cpu_malloc import environment_without_malloc_settings
from nanoi2v_diffusers.training import common
from nanoi2v_diffusers.training.common import (
    TrainingConfig,
    append_jsonl,
    build_dataloader,
    build_dataset,
    checkpoint_step,
    drop_records_after_step,
    infinite_batches,
    list_checkpoints,
    parse_config,
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


def test_shapes_data_and_infinite_batches():
    config = ExampleConfig(resolution=32, num_frames=5, train_batch_size=2, num_validation_samples=3)
    assert len(build_dataset(config, "validation")) == 3
    loader = build_dataloader(torch.utils.data.Subset(build_dataset(config, "train"), range(3)), config, shuffle=True)
    batches = infinite_batches(loader)
    # 3 clips with drop_last: one batch per epoch, and the iterator keeps going across epochs.
    shapes = [tuple(next(batches)["pixel_values"].shape) for _ in range(3)]
    assert shapes == [(2, 3, 5, 32, 32)] * 3


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
    monkeypatch.setattr(common, "keep_freed_cpu_memory", lambda: calls.append("kept") or True)
    accelerator = common.build_accelerator(TrainingConfig(output_dir=str(tmp_path), report_to="none"))
    assert accelerator.device.type == "cpu" and calls == ["kept"]
