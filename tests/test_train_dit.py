"""training/train_dit.py, training/precompute_latents.py and the data-order / checkpoint helpers they use.

Runs call `main(argv)` in-process with the tiny config, a tiny random BERT and a tiny random VAE.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from datasets import Dataset
from datasets.distributed import split_dataset_by_node
from safetensors.torch import load_file
from training_fixtures import (  # noqa: F401
    assets,
    fresh_accelerator_state,
    single_thread,
    tiny_dit_argv,
    write_tiny_pipeline,
)

from nanoi2v_diffusers import NanoI2VPipeline
from nanoi2v_diffusers.data.latent_cache import LatentCacheInfo, load_latent_cache
from nanoi2v_diffusers.data.sampling import ResumableSampler, shard_dataset, step_generator
from nanoi2v_diffusers.data.shapes import CAPTION_CLAUSE_SEPARATOR
from nanoi2v_diffusers.models import AutoencoderKLNanoI2V
from nanoi2v_diffusers.models.transformer_nanoi2v import NanoI2VTransformer3DModel
from nanoi2v_diffusers.settings import parse_config
from nanoi2v_diffusers.text_encoders import encode_clauses, load_text_encoder, split_clauses
from nanoi2v_diffusers.training import precompute_latents, train_dit
from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig
from nanoi2v_diffusers.training.trainer import (
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
TINY_CONFIG = CONFIGS / "tiny.yaml"


_argv = tiny_dit_argv


def _log(output_dir: Path) -> dict:
    """{step: record} of the per-step records of train_log.jsonl."""
    lines = (output_dir / train_dit.TRAIN_LOG).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {record["step"]: record for record in records if "loss" in record}


def _safetensors(folder: Path) -> dict:
    return load_file(str(next(folder.glob("*.safetensors"))))


# ------------------------------------------------------------------------------------------- end to end


def test_tiny_run_saves_a_loadable_pipeline_with_ema_weights_card_and_videos(tmp_path, assets):
    out = tmp_path / "run"
    summary = train_dit.main(_argv(out, assets, "--report_to", "tensorboard"))

    log = _log(out)
    assert sorted(log) == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    assert all(math.isfinite(record["loss"]) for record in log.values())
    # Fewer steps than the window: the mean covers all of them; the last step's loss is kept beside it.
    assert summary["mean_loss_last_100_steps"] == pytest.approx(np.mean([record["loss"] for record in log.values()]))
    assert summary["final_loss"] == log[6]["loss"]
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    assert not list(out.glob(".partial-*"))
    assert len(list((out / "validation").glob("step-000006-*.gif"))) == 2
    assert (out / "validation" / "step-000006-sheet.png").is_file()

    # The saved transformer holds the EMA weights (checkpoint-6's EMA shadow), not the raw weights.
    pipe = NanoI2VPipeline.from_pretrained(out)
    ema_state = torch.load(out / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=True)
    raw = _safetensors(out / "checkpoint-6")
    names = [name for name, _ in pipe.transformer.named_parameters()]
    for name, parameter, shadow in zip(names, pipe.transformer.parameters(), ema_state["shadow_params"]):
        assert torch.equal(parameter, shadow), name
    assert any(not torch.equal(raw[name], shadow) for name, shadow in zip(names, ema_state["shadow_params"]))
    assert type(pipe.text_encoder).__name__ == "BertModel"  # a custom text encoder is saved with the pipeline

    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "samples/step-000006-0.gif" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert "validation" in events.Tags()["images"]

    frames = pipe(image=np.zeros((32, 32, 3), np.uint8), prompt="a red circle moves left", num_frames=5,
                  num_inference_steps=2, generator=torch.manual_seed(0)).frames  # fmt: skip
    assert frames.shape == (1, 5, 32, 32, 3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_run_continues_with_exactly_the_same_losses(tmp_path, assets, lora):
    common = ("--gradient_accumulation_steps", "2", "--checkpoints_total_limit", "none", "--validation_steps", "100")
    if lora:
        write_tiny_pipeline(tmp_path / "base", assets)
        common += ("--pretrained_transformer", str(tmp_path / "base"), "--lora_rank", "4")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_dit.main(_argv(full, assets, *common))
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    # As if the run had died after logging step 6 with only checkpoint-3 saved: steps 4-6 must not be logged twice.
    shutil.copy(full / train_dit.TRAIN_LOG, resumed / train_dit.TRAIN_LOG)
    train_dit.main(_argv(resumed, assets, *common, "--resume_from_checkpoint", "latest"))

    records = [json.loads(line) for line in (resumed / train_dit.TRAIN_LOG).read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4, 5, 6]
    assert ["summary" in record for record in records].count(True) == 1 and "summary" in records[-1]
    full_log, resumed_log = _log(full), _log(resumed)
    for step in (4, 5, 6):
        assert resumed_log[step]["loss"] == full_log[step]["loss"], step

    def saved_weights(run: Path) -> dict:
        return load_file(str(run / "pytorch_lora_weights.safetensors")) if lora else _safetensors(run / "transformer")

    for name, value in saved_weights(full).items():
        assert torch.equal(value, saved_weights(resumed)[name]), name


@pytest.mark.parametrize("tasks", ["{first_frame: 1}", "{first_last: 1, last_frame: 1, keyframes: 1, continuation: 1}"],
                         ids=["first-frame", "every-task"])
def test_training_from_the_cache_matches_training_on_the_fly(tmp_path, assets, tasks):
    """The cache holds the keyframe latents, so every conditioning task trains from it as it does on the fly."""
    cache = tmp_path / "cache"
    limit = ("--max_train_samples", "4", "--max_train_steps", "3", "--validation_steps", "100",
             "--conditioning_tasks", tasks)  # fmt: skip
    precompute_latents.main(_argv(tmp_path / "unused", assets, "--cache_dir", str(cache), *limit))
    assert LatentCacheInfo.load(cache).num_clips == 4

    train_dit.main(_argv(tmp_path / "cached", assets, "--cache_dir", str(cache), *limit))
    train_dit.main(_argv(tmp_path / "on_the_fly", assets, *limit))
    cached, on_the_fly = _log(tmp_path / "cached"), _log(tmp_path / "on_the_fly")
    for step in (1, 2, 3):
        assert cached[step]["loss"] == pytest.approx(on_the_fly[step]["loss"], rel=1e-4), step

    with pytest.raises(ValueError, match="text_shape"):  # a cache made for other settings is refused
        train_dit.main(_argv(tmp_path / "mismatch", assets, "--cache_dir", str(cache), "--max_sequence_length", "12"))


def test_clause_encoded_cache_trains_as_on_the_fly_and_the_pipeline_keeps_the_separator(tmp_path, assets):
    clauses = ("--text_clause_separator", CAPTION_CLAUSE_SEPARATOR)
    limit = ("--max_train_samples", "4", "--max_train_steps", "4", "--validation_steps", "100")
    cache = tmp_path / "cache"
    precompute_latents.main(_argv(tmp_path / "unused", assets, "--cache_dir", str(cache), *clauses, *limit))
    assert LatentCacheInfo.load(cache).text_clause_separator == CAPTION_CLAUSE_SEPARATOR

    train_dit.main(_argv(tmp_path / "cached", assets, "--cache_dir", str(cache), *clauses, *limit))
    train_dit.main(_argv(tmp_path / "on_the_fly", assets, *clauses, *limit))
    cached, on_the_fly = _log(tmp_path / "cached"), _log(tmp_path / "on_the_fly")
    for step in (1, 2, 3, 4):
        assert cached[step]["loss"] == pytest.approx(on_the_fly[step]["loss"], rel=1e-4), step
    text_encoder, tokenizer = load_text_encoder(str(assets["bert"]))
    row = load_latent_cache(cache)[0][0]
    assert len(split_clauses(row["caption"], CAPTION_CLAUSE_SEPARATOR)) == 2  # the first clip has two objects
    embeds, mask = encode_clauses(text_encoder, tokenizer, [row["caption"]], 32, CAPTION_CLAUSE_SEPARATOR)
    assert torch.equal(row["prompt_attention_mask"][: mask.shape[1]].long(), mask[0])
    torch.testing.assert_close(row["prompt_embeds"][: mask.shape[1]], embeds[0], atol=1e-5, rtol=1e-5)
    index = json.loads((tmp_path / "cached" / "model_index.json").read_text())
    assert index["text_clause_separator"] == CAPTION_CLAUSE_SEPARATOR

    with pytest.raises(ValueError, match="text_clause_separator"):  # whole-caption training on a clause cache
        train_dit.main(_argv(tmp_path / "mismatch", assets, "--cache_dir", str(cache), *limit))
    continued = ("--pretrained_transformer", str(tmp_path / "cached"))  # e.g. a LoRA on the clause pipeline
    train_dit.check_text_encoding_matches(parse_config(DiTTrainingConfig, _argv(tmp_path, assets, *continued, *clauses)))
    with pytest.raises(ValueError, match="encodes prompts with text_clause_separator="):
        train_dit.check_text_encoding_matches(parse_config(DiTTrainingConfig, _argv(tmp_path, assets, *continued)))


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run_after_a_checkpoint(tmp_path, assets, monkeypatch):
    original = train_dit.weighted_mse
    calls = {"count": 0}
    bad_steps = {2} | set(range(4, 100))

    def sometimes_nan(prediction, target, weights):
        calls["count"] += 1
        loss = original(prediction, target, weights)
        return loss * float("nan") if calls["count"] in bad_steps else loss

    monkeypatch.setattr(train_dit, "weighted_mse", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(train_dit.NonFiniteLossError, match="max_nonfinite_steps=2"):
        train_dit.main(_argv(out, assets, "--max_nonfinite_steps", "2", "--checkpoints_total_limit", "none"))

    log = _log(out)
    assert log[2]["skipped"] and log[2]["loss"] is None
    assert "skipped" not in log[3] and math.isfinite(log[3]["loss"])
    assert sorted(log) == [1, 2, 3, 4, 5]  # steps 4 and 5 fail: the streak of 2 stops the run at step 5
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-5"]
    stopped, before = _safetensors(out / "checkpoint-5"), _safetensors(out / "checkpoint-3")
    for name, value in stopped.items():  # the skipped steps left the weights finite and untouched
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


@pytest.fixture
def uploads(monkeypatch) -> dict:
    """{repo_id: sorted relative paths of the files uploaded}, with the Hub calls replaced by fakes."""
    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded[repo_id] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(train_dit.hub_utils, "create_repo", lambda repo_id, **kwargs: repo_id)
    monkeypatch.setattr(train_dit.hub_utils, "upload_folder", fake_upload_folder)
    return uploaded


def test_bf16_run_with_builtin_text_encoder_saves_float32_without_it_and_pushes_only_the_pipeline(tmp_path, assets, uploads):
    out = tmp_path / "run"
    argv = ["--config", str(TINY_CONFIG), "--output_dir", str(out), "--pretrained_vae", str(assets["vae"]),
            "--max_train_steps", "1", "--checkpointing_steps", "1", "--mixed_precision", "bf16",
            "--gradient_checkpointing", "--push_to_hub", "--hub_model_id", "user/tiny"]  # fmt: skip
    train_dit.main(argv)

    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and not (out / "text_encoder").exists()
    files = uploads["user/tiny"]
    assert "model_index.json" in files and "README.md" in files
    assert any(name.startswith("transformer/") and name.endswith(".safetensors") for name in files)
    assert not any(name.startswith(("checkpoint-", "validation", "logs")) or name.endswith(".pkl") for name in files)
    # The built-in text encoder is not stored: model_index.json names it, from_pretrained restores it.
    assert index["default_text_encoder"] == "all-MiniLM-L6-v2" and index["input_domain"] == "shapes"
    card = (out / "README.md").read_text()
    assert "built-in all-MiniLM-L6-v2: not stored here" in card and "text_encoder=" not in card
    assert type(NanoI2VPipeline.from_pretrained(out).text_encoder).__name__ == "BertModel"
    # bf16 autocast trained it, but the saved weights stay float32.
    assert all(value.dtype == torch.float32 for value in _safetensors(out / "transformer").values())
    assert all(value.dtype == torch.float32 for value in _safetensors(out / "vae").values())


def test_lora_run_trains_only_the_adapter_and_saves_it_for_load_lora_weights(tmp_path, assets, uploads):
    base = write_tiny_pipeline(tmp_path / "base", assets)
    out = tmp_path / "lora"
    train_dit.main(_argv(out, assets, "--pretrained_transformer", str(tmp_path / "base"), "--lora_rank", "4",
                         "--lora_alpha", "8", "--max_train_steps", "3", "--learning_rate", "1e-2",
                         "--push_to_hub", "--hub_model_id", "user/tiny-lora"))  # fmt: skip

    # Only the adapter is saved (float32, with its PEFT config), and published with the card and samples.
    assert not (out / "model_index.json").exists() and not (out / "transformer").exists()
    layers = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert layers and all(".lora_A." in name or ".lora_B." in name for name in layers)
    assert all(value.dtype == torch.float32 for value in layers.values())
    assert {name.split(".lora_")[0].split("attn")[1].split(".", 1)[1] for name in layers} == set(
        train_dit.LORA_TARGET_MODULES)
    assert sorted(uploads["user/tiny-lora"]) == ["README.md", "pytorch_lora_weights.safetensors",
                                                 "samples/step-000003-0.gif", "samples/step-000003-1.gif"]  # fmt: skip
    card = (out / "README.md").read_text()
    # A local base is named in the text, never as base_model (a Hub id), and no absolute path is in the card.
    assert "base_model:" not in card and "- lora" in card and str(tmp_path) not in card
    assert "LoRA weights for the local pipeline folder `base`" in card
    assert 'pipe.from_pretrained("base")' not in card and 'NanoI2VPipeline.from_pretrained("base")' in card
    assert 'pipe.load_lora_weights("user/tiny-lora")' in card and "rank 4, alpha 8, on to_q, to_k, to_v, to_out.0" in card

    # The saved adapter is the EMA of the adapter alone: the EMA holds one tensor per adapter weight.
    ema_state = torch.load(out / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=True)
    assert len(ema_state["shadow_params"]) == len(layers)

    # The base weights did not move; the zero-initialised B matrices did, so the adapter changes the output.
    pipe = NanoI2VPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(out)
    (adapter,) = pipe.transformer.peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (4, 8)  # read from the file's metadata
    adapted = dict(pipe.transformer.named_parameters())
    for name, parameter in base.transformer.named_parameters():
        lora_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(adapted.get(name, adapted.get(lora_name)), parameter, rtol=0, atol=0)
    assert all(value.abs().max() > 0 for name, value in layers.items() if ".lora_B." in name)
    inputs = dict(image=np.zeros((32, 32, 3), np.uint8), prompt="a red circle moves left", num_frames=5,
                  num_inference_steps=2, output_type="latent")  # fmt: skip
    with_lora = pipe(**inputs, generator=torch.manual_seed(0)).frames
    without = pipe(**inputs, generator=torch.manual_seed(0), attention_kwargs={"scale": 0.0}).frames
    assert not torch.allclose(with_lora, without, atol=1e-5)


def test_lora_config_rules(tmp_path, assets):
    write_tiny_pipeline(tmp_path / "base", assets)
    with pytest.raises(ValueError, match="lora_rank needs pretrained_transformer to be a pipeline folder"):
        DiTTrainingConfig(lora_rank=4, pretrained_transformer=str(tmp_path / "base" / "transformer"))
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        DiTTrainingConfig(lora_rank=0, pretrained_transformer=str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"fused projections of earlier versions \['to_qkv'\].*to_q, to_k, to_v"):
        DiTTrainingConfig(lora_rank=2, lora_target_modules=["to_qkv", "to_q"],
                          pretrained_transformer=str(tmp_path / "base"))
    config = DiTTrainingConfig(lora_rank=2, pretrained_transformer=str(tmp_path / "base"),
                               transformer_overrides={"num_text_refiner_layers": 1})  # fmt: skip
    with pytest.raises(ValueError, match="only the adapter trains.*num_text_refiner_layers"):
        train_dit.build_transformer(config, latent_channels=4, text_dim=32)
    # A pipeline folder also serves full training: its transformer/ is loaded.
    config = DiTTrainingConfig(pretrained_transformer=str(tmp_path / "base"))
    transformer = train_dit.build_transformer(config, latent_channels=4, text_dim=32)
    assert all(parameter.requires_grad for parameter in transformer.parameters())


# ------------------------------------------------------------------------------------------- pieces


def _encoded(mean: torch.Tensor, text_tokens: int) -> dict:
    """An encoded batch with a zero-width posterior (so x0 is the normalised mean) and all-kept text."""
    batch = mean.shape[0]
    return {"posterior_mean": mean, "posterior_std": torch.zeros_like(mean),
            "prompt_embeds": torch.randn(batch, text_tokens, 32),
            "prompt_attention_mask": torch.ones(batch, text_tokens, dtype=torch.long)}  # fmt: skip


def test_diffusion_inputs_follow_the_conditioning_layout(assets):
    vae = AutoencoderKLNanoI2V.from_pretrained(assets["vae"])
    config = DiTTrainingConfig(image_dropout=0.0, text_dropout=0.0, condition_noise_std=0.0)
    scheduler = train_dit.build_noise_scheduler(config)
    mean = torch.randn(3, 4, 2, 4, 4)
    encoded = _encoded(mean, text_tokens=8)

    kwargs, target, weights = train_dit.diffusion_inputs(encoded, vae, scheduler, config, torch.manual_seed(0))

    x0 = vae.normalize_latents(mean)
    sigmas = kwargs["timestep"] / scheduler.config.num_train_timesteps
    assert ((sigmas > 0) & (sigmas < 1)).all() and weights.shape == (3,)
    torch.testing.assert_close(kwargs["hidden_states"] - sigmas.view(-1, 1, 1, 1, 1) * target, x0)
    condition = kwargs["condition"]
    torch.testing.assert_close(condition[:, :4, :1], x0[:, :, :1])  # the image latent at frame 0 ...
    assert (condition[:, 4, :1] == 1).all() and (condition[:, :, 1:] == 0).all()  # ... flagged, zeros elsewhere
    assert torch.equal(kwargs["encoder_attention_mask"], encoded["prompt_attention_mask"])

    dropped = DiTTrainingConfig(image_dropout=1.0, text_dropout=1.0)
    kwargs, _, _ = train_dit.diffusion_inputs(encoded, vae, scheduler, dropped, torch.manual_seed(0))
    assert (kwargs["condition"] == 0).all()
    assert (kwargs["encoder_attention_mask"] == 0).all() and (kwargs["encoder_hidden_states"] == 0).all()


@pytest.mark.parametrize("task", ["first_frame", "first_last", "last_frame", "keyframes", "continuation"])
def test_each_conditioning_task_conditions_on_its_frames(assets, task):
    """The clip's own latents where frames open the clip (frame 0, a continuation), the one-frame keyframe latents
    elsewhere (the last frame, keyframes), flagged by the mask channel; nothing else is seen."""
    vae = AutoencoderKLNanoI2V.from_pretrained(assets["vae"])
    config = DiTTrainingConfig(image_dropout=0.0, text_dropout=0.0, condition_noise_std=0.0,
                               conditioning_tasks={task: 1.0})  # fmt: skip
    scheduler = train_dit.build_noise_scheduler(config)
    mean = torch.randn(16, 4, 5, 4, 4)
    keyframes = torch.cat([mean[:, :, :1], torch.randn(16, 4, 4, 4, 4)], dim=2)  # frame 0: the clip's own
    encoded = {**_encoded(mean, text_tokens=8), "keyframe_mean": keyframes}
    kwargs, _, _ = train_dit.diffusion_inputs(encoded, vae, scheduler, config, torch.manual_seed(0))
    condition, known = kwargs["condition"], (kwargs["condition"][:, 4, :, 0, 0] == 1)  # (B, T)
    assert known.any(1).all()
    for row in range(16):
        for frame in range(5):
            latents = condition[row, :4, frame]
            if not known[row, frame]:
                assert not latents.any() and not condition[row, 4, frame].any()
            elif frame == 0 or task in ("first_frame", "continuation"):  # the clip's own latents
                torch.testing.assert_close(latents, vae.normalize_latents(mean)[row, :, frame])
            else:  # a keyframe encoded alone
                torch.testing.assert_close(latents, vae.normalize_latents(keyframes)[row, :, frame])
    if task in ("first_last", "last_frame"):
        assert known[:, -1].all() and known[:, 0].all() == (task == "first_last")
    if task == "continuation":
        assert torch.equal(known, torch.arange(5)[None] < known.sum(1, keepdim=True))  # the opening frames
    without_keyframes = _encoded(mean, text_tokens=8)
    if task in ("first_frame", "continuation"):  # the clip's own latents suffice
        train_dit.diffusion_inputs(without_keyframes, vae, scheduler, config, torch.manual_seed(0))
    else:
        with pytest.raises(ValueError, match="no keyframe_mean"):
            train_dit.diffusion_inputs(without_keyframes, vae, scheduler, config, torch.manual_seed(0))


def test_dropouts_are_independent_and_near_their_rates(assets):
    vae = AutoencoderKLNanoI2V.from_pretrained(assets["vae"])
    config = DiTTrainingConfig(image_dropout=0.3, text_dropout=0.3)
    scheduler = train_dit.build_noise_scheduler(config)
    encoded = _encoded(torch.zeros(2000, 4, 1, 2, 2), text_tokens=2)
    kwargs, _, _ = train_dit.diffusion_inputs(encoded, vae, scheduler, config, torch.manual_seed(0))
    image_dropped = kwargs["condition"][:, 4, 0, 0, 0] == 0
    text_dropped = kwargs["encoder_attention_mask"][:, 0] == 0
    for dropped in (image_dropped, text_dropped):
        assert abs(dropped.float().mean().item() - 0.3) < 0.05
    both = (image_dropped & text_dropped).float().mean().item()
    assert abs(both - 0.09) < 0.03  # independent: P(both) = 0.3 * 0.3


def test_step_generator_depends_on_seed_rank_and_step_only():
    draw = lambda *key: torch.rand(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    for other in ((1, 0, 5), (0, 1, 5), (0, 0, 6)):
        assert not torch.equal(draw(0, 0, 5), draw(*other))


def test_resumable_sampler_restarts_anywhere_and_covers_each_epoch():
    def take(sampler, count):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    stream = take(ResumableSampler(7, seed=3), 30)
    for start in (0, 5, 7, 16):
        assert take(ResumableSampler(7, seed=3, start=start), 30 - start) == stream[start:]
    for epoch in range(4):
        assert sorted(stream[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # reshuffled every epoch
    with pytest.raises(ValueError, match="non-empty"):
        ResumableSampler(0)


@pytest.mark.parametrize("size, world_size", [(10, 2), (7, 3), (5, 4)])
def test_shard_dataset_splits_like_datasets_split_by_node(size, world_size):
    table = Dataset.from_dict({"index": list(range(size))})
    for rank in range(world_size):
        expected = split_dataset_by_node(table, rank=rank, world_size=world_size)["index"]
        assert list(shard_dataset(list(range(size)), rank, world_size)) == expected


def test_checkpoint_writes_are_atomic_and_rotated(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 1, total_limit=2)

    def crash_midway(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(accelerator, "save_state", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, total_limit=2)
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    monkeypatch.undo()

    for step in (2, 3):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".partial-*"))
    del model


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny", "shapes_64"])
def test_shipped_configs_parse_and_build_their_transformer(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root
    config = parse_config(DiTTrainingConfig, ["--config", str(CONFIGS / f"{name}.yaml")])
    with torch.device("meta"):
        transformer = train_dit.build_transformer(config, latent_channels=16, text_dim=384)
    assert transformer.config.in_channels == 33 and transformer.config.text_dim == 384
    assert config.resolution % 16 == 0 and (config.num_frames - 1) % 4 == 0


def test_shipped_configs_that_encode_clauses_split_the_shapes_captions():
    """A separator typed into a YAML file must be the one the shapes captions are made with."""
    found = []

    def separators(value):
        if isinstance(value, dict):
            found.extend(value[key] for key in value if key == "text_clause_separator" and value[key] is not None)
            for item in value.values():
                separators(item)

    for path in sorted(CONFIGS.glob("*.yaml")):
        separators(yaml.safe_load(path.read_text()))
    assert len(found) >= 3 and set(found) == {CAPTION_CLAUSE_SEPARATOR}
    # The shipped pipeline encodes prompts so; a LoRA on it must train on captions encoded the same way.
    index = json.loads((REPO / "examples" / "nanoi2v-shapes-64" / "model_index.json").read_text())
    assert index["text_clause_separator"] == CAPTION_CLAUSE_SEPARATOR


@pytest.mark.parametrize("name", ["shapes_64_lora", "shapes_64_lora_three_objects"])
def test_shipped_lora_configs_adapt_the_shipped_pipeline(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root, as the README runs them
    config = parse_config(DiTTrainingConfig, ["--config", str(CONFIGS / f"{name}.yaml")])
    transformer = train_dit.build_transformer(config, latent_channels=16, text_dim=384)
    trainable = [key for key, parameter in transformer.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in key or ".lora_B." in key for key in trainable)
    # A and B on each block's eight projections: to_q, to_k, to_v and to_out.0 of attn1 and of attn2.
    assert len(trainable) == 2 * 8 * transformer.config.num_layers


def test_a_pretrained_transformer_grows_by_its_overrides(tmp_path):
    pretrained = NanoI2VTransformer3DModel.from_preset("tiny", in_channels=33, out_channels=16, text_dim=8)
    with torch.no_grad():
        for param in pretrained.parameters():
            param.normal_(std=0.1)  # a trained model: no zero-initialised output left
    pretrained.save_pretrained(tmp_path)
    # Saved before the refiner existed: the key is missing from the file and defaults on loading.
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "num_text_refiner_layers"}))
    same_size = {"num_layers": pretrained.config.num_layers}  # what continuation configs inherit
    config = DiTTrainingConfig(pretrained_transformer=str(tmp_path), transformer_overrides=same_size)
    assert not train_dit.build_transformer(config, latent_channels=16, text_dim=8).text_refiner

    config.transformer_overrides = {**same_size, "num_text_refiner_layers": 1}
    grown = train_dit.build_transformer(config, latent_channels=16, text_dim=8).eval()
    assert len(grown.text_refiner) == 1 and grown.config.num_text_refiner_layers == 1
    latents, condition = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 17, 2, 4, 4)
    text = torch.randn(1, 5, 8)
    with torch.no_grad():  # the new block starts as the identity: the same outputs as the saved model
        expected = pretrained.eval()(latents, 500.0, text, condition=condition).sample
        torch.testing.assert_close(grown(latents, 500.0, text, condition=condition).sample, expected)
    with pytest.raises(ValueError, match="may only add modules.*would be dropped"):
        train_dit.grow_transformer(pretrained, {"num_layers": 1})


def test_config_rules_raise_clear_errors():
    with pytest.raises(ValueError, match="image_dropout"):
        DiTTrainingConfig(image_dropout=1.5)
    with pytest.raises(ValueError, match="hub_model_id"):
        DiTTrainingConfig(push_to_hub=True)
    with pytest.raises(ValueError, match="transformer_preset"):
        DiTTrainingConfig(transformer_preset="XL")
    config = parse_config(DiTTrainingConfig, ["--transformer_overrides", "{num_layers: 3, ffn_dim: 64}"])
    assert config.transformer_overrides == {"num_layers": 3, "ffn_dim": 64}
