"""training/recipe.py and the recipes and configs in training/configs: the built-in model's phases chain, every
config runs on a fresh clone, and a recipe killed in the middle of a phase continues to the same weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_fixtures import fresh_accelerator_state, single_thread, write_tiny_bert  # noqa: F401

from nanoi2v_diffusers.data.shapes import CAPTION_CLAUSE_SEPARATOR
from nanoi2v_diffusers.settings import read_yaml_config
from nanoi2v_diffusers.training import recipe
from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig, build_transformer
from nanoi2v_diffusers.training.train_vae import VAETrainingConfig
from nanoi2v_diffusers.training.trainer import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
BUILT_IN = CONFIGS / "shapes_64_recipe.yaml"
TINY = CONFIGS / "tiny_recipe.yaml"
TIMEOUT_S = 240


def _phases(path: Path, tmp_path: Path, device: str = "cpu", **kwargs) -> dict:
    phases = recipe.load_recipe(path, device, output_dir=str(tmp_path), **kwargs)
    for phase in phases:  # as if every phase had run: the folders later phases read exist
        phase.output.mkdir(parents=True, exist_ok=True)
    return {phase.name: phase for phase in phases}


def test_the_built_in_recipe_chains_its_phases(tmp_path):
    phases = _phases(BUILT_IN, tmp_path)
    assert list(phases) == ["vae-images", "vae-clips", "vae-decoder", "latents", "dit", "dit-tasks"]
    configs = {name: phase.config() for name, phase in phases.items()}
    images, clips, decoder, latents, dit, tasks = configs.values()
    assert images.num_frames == 1 and images.pretrained_vae is None
    assert clips.pretrained_vae == str(tmp_path / "vae-images") and clips.num_frames == 17
    assert decoder.pretrained_vae == str(tmp_path / "vae-clips") and decoder.train_decoder_only
    # The cache holds exactly the DiT's clips, encoded as it encodes them, with the final decoder's (frozen) encoder.
    assert dit.cache_dir == latents.cache_dir == str(tmp_path / "latents")
    data_keys = ("pretrained_vae", "text_encoder", "max_sequence_length", "text_clause_separator", "resolution",
                 "num_frames", "max_train_samples", "dataset", "shapes_min_objects", "shapes_max_objects")  # fmt: skip
    assert all(getattr(dit, key) == getattr(latents, key) for key in data_keys)
    assert dit.pretrained_vae == str(tmp_path / "vae-decoder") and dit.pretrained_transformer is None
    assert dit.text_clause_separator == CAPTION_CLAUSE_SEPARATOR and dit.use_ema
    assert dit.conditioning_tasks == {"first_frame": 1.0}
    # Then every conditioning task, from the DiT's pipeline, on the same cache (it holds the keyframe latents).
    assert tasks.pretrained_transformer == str(tmp_path / "dit") and tasks.cache_dir == latents.cache_dir
    assert set(tasks.conditioning_tasks) == {"first_frame", "first_last", "last_frame", "keyframes", "continuation"}
    assert all(getattr(tasks, key) == getattr(latents, key) for key in data_keys)
    assert {config.resolution for config in configs.values()} == {64}


def test_on_cuda_the_recipe_trains_larger_batches_in_bf16_on_as_many_samples(tmp_path):
    cpu = {name: phase.settings for name, phase in _phases(BUILT_IN, tmp_path / "cpu").items()}
    cuda = {name: phase.settings for name, phase in _phases(BUILT_IN, tmp_path / "cuda", device="cuda").items()}
    for name in ("vae-images", "vae-clips", "vae-decoder", "dit", "dit-tasks"):
        factor = cuda[name]["train_batch_size"] // cpu[name]["train_batch_size"]
        assert factor == (16 if name == "vae-decoder" else 4), name
        assert cuda[name]["max_train_steps"] == -(-cpu[name]["max_train_steps"] // factor), name
        assert cuda[name]["learning_rate"] == pytest.approx(float(cpu[name]["learning_rate"]) * factor**0.5), name
        assert cuda[name]["mixed_precision"] == "bf16" and cuda[name]["dataloader_num_workers"] == 8
    assert cuda["dit"]["torch_compile"] and not cpu["dit"].get("torch_compile")
    assert cuda["latents"]["max_train_samples"] == cpu["latents"]["max_train_samples"]  # the same clips


@pytest.mark.parametrize("name, millions", [("shapes_64_recipe", (4.5, 5.5)), ("gpu_256_recipe", (110, 130))])
def test_a_recipes_dit_builds_at_its_size(name, millions, tmp_path):
    config = _phases(CONFIGS / f"{name}.yaml", tmp_path)["dit"].config()
    with torch.device("meta"):
        transformer = build_transformer(config, latent_channels=16, text_dim=384)
    assert millions[0] < sum(p.numel() for p in transformer.parameters()) / 1e6 < millions[1]
    assert config.resolution % 16 == 0 and (config.num_frames - 1) % 4 == 0


def test_steps_scale_shortens_every_phase_and_its_cache(tmp_path):
    full = _phases(BUILT_IN, tmp_path / "full")
    short = _phases(BUILT_IN, tmp_path / "short", steps_scale=0.01)
    assert short["vae-decoder"].settings["max_train_steps"] == 640
    assert (
        short["vae-images"].settings["lr_warmup_steps"] == 1 and short["vae-images"].settings["max_train_steps"] == 15
    )
    assert short["vae-images"].settings["checkpointing_steps"] == short["vae-images"].settings["validation_steps"] == 15
    assert short["latents"].settings["max_train_samples"] == short["dit"].settings["max_train_samples"] == 320
    assert all(short[name].settings.get("learning_rate") == full[name].settings.get("learning_rate") for name in full)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_runs_on_a_fresh_clone(path, tmp_path, monkeypatch):
    """Each path a config needs is in the repository, or made by an earlier phase of the same recipe."""
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root, as the README runs them
    if "phases" in yaml.safe_load(path.read_text()):
        phases = recipe.load_recipe(path, "cpu", output_dir=str(tmp_path))
        made = set()
        for phase in phases:
            for value in phase.settings.values():
                if isinstance(value, str) and value.startswith(str(tmp_path)) and value != str(phase.output):
                    assert value in made, f"{phase.name} reads {value}, which no earlier phase makes"
            made.add(str(phase.output))
        return
    config_class = VAETrainingConfig if path.name.startswith("vae_") else DiTTrainingConfig
    config = config_class(**read_yaml_config(path, config_class))  # missing local paths raise here
    for value in (getattr(config, "pretrained_vae", None), getattr(config, "pretrained_transformer", None)):
        assert value is None or (REPO / value).is_dir()


def _tiny_argv(out: Path, bert: Path) -> list:
    return [str(TINY), "--output_dir", str(out), "--set", f"text_encoder={bert}"]


def _run_tiny_in_process(out: Path, bert: Path) -> Path:
    return recipe.run(TINY, "cpu", overrides={"text_encoder": str(bert)}, launcher=None, output_dir=str(out))


@pytest.mark.slow
def test_a_recipe_killed_in_a_phase_continues_where_it_stopped_to_the_same_weights(tmp_path):
    bert = write_tiny_bert(tmp_path / "bert")
    reference = _run_tiny_in_process(tmp_path / "reference", bert)
    assert (reference / "model_index.json").is_file()
    phases = sorted(path.name for path in reference.parent.iterdir() if path.is_dir())
    assert phases == ["dit", "dit-tasks", "latents", "vae"]

    # One command, its phases in processes of their own; killed (all of them) once the VAE phase saved a checkpoint.
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "training" / "recipe.py"), *_tiny_argv(out, bert)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while not list_checkpoints(out / "vae"):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "vae" / "training_summary.json").exists()  # it died inside the phase

    finished = _run_tiny_in_process(out, bert)  # started again: the VAE phase resumes, then the others run
    for folder in ("transformer", "vae"):
        name = "diffusion_pytorch_model.safetensors"
        expected, trained = load_file(str(reference / folder / name)), load_file(str(finished / folder / name))
        assert all(torch.equal(trained[key], value) for key, value in expected.items()), folder

    # Started once more, it finds every phase done; a phase whose settings changed since is refused.
    assert _run_tiny_in_process(out, bert) == finished
    with pytest.raises(
        ValueError, match=r"Phase vae: .* holds a finished run with other settings \(learning_rate: 0.002 -> 0.5\)"
    ):
        recipe.run(TINY, "cpu", overrides={"text_encoder": str(bert), "learning_rate": 0.5}, launcher=None,
                   output_dir=str(out))  # fmt: skip
    with pytest.raises(ValueError, match=r"Phase latents: .* other settings \(clips: 'shapes train clips 0-7, "):
        recipe.run(TINY, "cpu", overrides={"text_encoder": str(bert), "max_train_samples": 4}, launcher=None,
                   output_dir=str(out))  # a cache of other clips is not reused either  # fmt: skip
