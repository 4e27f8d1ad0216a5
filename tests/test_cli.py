"""The `nanoi2v` command line (nanoi2v_diffusers/cli.py), the examples that wrap it, and what a new user meets
first: arguments checked before anything loads, clear errors for missing models, honest warnings, the README's
own training commands."""

import json
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_fixtures import assets, fresh_accelerator_state, single_thread, write_tiny_pipeline  # noqa: F401

from nanoi2v_diffusers import NanoI2VPipeline, NanoI2VTransformer3DModel, cli
from nanoi2v_diffusers.data import read_video_frames
from nanoi2v_diffusers.safe_loading import ConfigValidationError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, assets):  # noqa: F811
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    write_tiny_pipeline(folder, assets)
    return folder


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although an argument was bad")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--output", "{tmp}/x.avi"], "--output '{tmp}/x.avi': the suffix must be one of .mp4, .gif"),
        (["--image", "{tmp}/missing.png"], "--image '{tmp}/missing.png': no such file"),
        (["--image", "{tmp}/corrupt.png"], "--image '{tmp}/corrupt.png': not a readable image"),
        (["--image", "{tmp}/notes.txt"], "--image '{tmp}/notes.txt': not a readable image"),
        (["--num_frames", "18"], r"--num_frames 18: must be 1 \+ 4\*k .*nearest valid is 17"),
        (["--height", "70"], "--height 70: must be a positive multiple of 16 .*nearest valid is 64"),
        (["--guidance_scale", "0.5"], r"--guidance_scale 0.5: must be >= 1 \(1 turns guidance off\)"),
        (["--guidance_scale", "abc"], "argument --guidance_scale: invalid float value: 'abc'"),
        (["--num_inference_steps", "0"], "--num_inference_steps 0: must be >= 1"),
        (["--negative_guidance_scale", "2"], "--negative_guidance_scale 2.0: needs a --negative_prompt"),
        (["--output", "{tmp}/notes.txt/out.mp4"], "--output '{tmp}/notes.txt/out.mp4': .*notes.txt is not a writable"),
        (["--solver", "rk4"], "--solver 'rk4': must be one of euler, heun"),
    ],
)
def test_bad_arguments_stop_with_one_line_before_anything_loads(flags, message, tmp_path, tiny_model, capsys,
                                                               nothing_loads):  # fmt: skip
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then nothing
    (tmp_path / "notes.txt").write_text("not an image")
    argv = ["generate", "--model", str(tiny_model), *[flag.format(tmp=tmp_path) for flag in flags]]
    line = _error_line(capsys, argv)
    assert line.startswith("nanoi2v generate: error: ")
    assert re.search(message.format(tmp=tmp_path), line), line
    assert not list(tmp_path.glob("*.mp4")) and not (REPO / "outputs" / "generated.mp4").exists()


def test_a_missing_model_folder_is_named_at_once(tmp_path, capsys, nothing_loads):
    line = _error_line(capsys, ["generate", "--model", str(tmp_path / "nope")])
    assert "--model" in line and "no such folder" in line
    (tmp_path / "empty").mkdir()
    line = _error_line(capsys, ["evaluate", "--model", str(tmp_path / "empty")])
    assert "not a pipeline folder: it has no model_index.json" in line


def test_generate_writes_the_video_and_an_rgba_image_is_cleaned_up_as_the_api_does(tmp_path, tiny_model):
    # A transparent image over a white background: composited on black by the pipeline (the shapes background).
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[8:20, 8:20] = (255, 0, 0, 255)  # an opaque red square; the rest is transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "first.png")
    out = tmp_path / "video.mkv"
    settings = ["--num_frames", "5", "--num_inference_steps", "2", "--seed", "3", "--lossless"]
    status = cli.main(["generate", "--model", str(tiny_model), "--image", str(tmp_path / "first.png"), "--prompt",
                       "a red square moves left", "--output", str(out), *settings])  # fmt: skip
    assert status is None  # the console script's wrapper exits with main's return value (and prints any other)
    written = read_video_frames(out)  # (F, H, W, 3) uint8, exact

    pipe = NanoI2VPipeline.from_pretrained(tiny_model)
    expected = pipe(image=Image.open(tmp_path / "first.png"), prompt="a red square moves left", num_frames=5,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(3)).frames[0]  # fmt: skip
    white = pipe(image=Image.open(tmp_path / "first.png").convert("RGB"), prompt="a red square moves left",
                 num_frames=5, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).frames[0]  # fmt: skip
    assert np.array_equal(written, cli.video_to_uint8(expected))  # the API's video, frame for frame
    assert not np.array_equal(written[0], cli.video_to_uint8(white)[0])  # not the white background of convert("RGB")


def test_several_videos_and_the_example_script_with_its_old_flags(tmp_path, tiny_model):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import generate  # examples/generate.py
    finally:
        sys.path.remove(str(EXAMPLES))
    paths = generate.main(["--model", str(tiny_model), "--prompt", "a red circle moves left", "--frames", "5",
                           "--steps", "2", "--guidance", "3", "--heun", "--out", str(tmp_path / "v.gif"),
                           "--num_videos_per_prompt", "2"])  # fmt: skip
    assert paths == [tmp_path / "v-0.gif", tmp_path / "v-1.gif"]
    assert all(read_video_frames(path).shape == (5, 64, 64, 3) for path in paths)  # no image: 64 x 64


def test_the_installed_command_shows_every_default(tmp_path):
    command = Path(sys.executable).with_name("nanoi2v")
    assert command.is_file(), "pip install -e . installs the nanoi2v console script"
    result = subprocess.run([str(command), "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag, default in (("--num_inference_steps", "20"), ("--guidance_scale", "5.0"), ("--num_frames", "17")):
        assert f"{flag} " in result.stdout and f"default: {default}" in result.stdout


# ------------------------------------------------------------------------------------------- configs and loading


@pytest.mark.parametrize("key, value", [("num_layers", 0), ("num_layers", -1), ("ffn_dim", 0),
                                        ("patch_size", [1, 0, 2])])  # fmt: skip
def test_a_transformer_config_out_of_range_is_refused_naming_file_key_value_and_rule(tmp_path, tiny_model, key, value):
    folder = tmp_path / "transformer"
    NanoI2VTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigValidationError, match=rf"{folder / 'config.json'}: key '{key}' must be .*>= .*got "):
        NanoI2VTransformer3DModel.from_pretrained(folder)


def test_missing_local_folders_and_an_unreachable_hub_are_said_plainly(tmp_path, tiny_model, monkeypatch):
    pipe = NanoI2VPipeline.from_pretrained(tiny_model)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # runs/ is a local folder: runs/does_not_exist is a local path, not a Hub id
    with pytest.raises(ValueError, match="no such folder 'runs/does_not_exist'"):
        pipe.load_lora_weights("runs/does_not_exist")
    with pytest.raises(OSError, match="'user/lora' is not a local folder, and the Hub could not be asked for it"):
        pipe.load_lora_weights("user/lora")  # offline, and not in the cache
    with pytest.raises(ValueError, match=f"pretrained_model_name_or_path: no such folder '{tmp_path}/x'"):
        NanoI2VPipeline.from_pretrained(tmp_path / "x")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the Hub does not answer

    def no_connection(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr("diffusers.pipelines.pipeline_utils.model_info", no_connection)
    with pytest.raises(OSError, match=r"'user/model' is not a local folder, and the Hub could not be asked .*network"):
        NanoI2VPipeline.from_pretrained("user/model")


# ------------------------------------------------------------------------------------------- honest limits


def test_a_shapes_model_warns_once_about_inputs_unlike_its_training_data(tiny_model, caplog):
    pipe = NanoI2VPipeline.from_pretrained(tiny_model)
    pipe.register_to_config(input_domain="shapes")
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=17, num_inference_steps=1, height=64, width=64, output_type="latent")
    black = np.zeros((64, 64, 3), np.uint8)
    black[10:20, 10:20] = (255, 0, 0)
    with caplog.at_level(logging.WARNING):
        pipe(image=black, prompt="the red square moves left", **call)
    assert "unlike" not in caplog.text  # like the training clips: no word
    grey_photo = np.full((64, 64, 3), 128, np.uint8)
    with caplog.at_level(logging.WARNING):
        pipe(image=grey_photo, prompt="un ballon rouge va à droite", **call)
    warnings = [record.message for record in caplog.records if "unlike" in record.message]
    assert len(warnings) == 1
    assert "an image is 100% non-black" in warnings[0] and "is not English" in warnings[0]


# ------------------------------------------------------------------------------------------- text encoders


def test_the_builtin_text_encoder_is_not_stored_unless_asked_and_comes_back(tmp_path):
    from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
    from nanoi2v_diffusers.schedulers import NanoI2VFlowMatchScheduler
    from nanoi2v_diffusers.text_encoders import load_minilm

    text_encoder, tokenizer = load_minilm()
    transformer = NanoI2VTransformer3DModel.from_preset("tiny", in_channels=9, out_channels=4, text_dim=384,
                                                        num_layers=1)  # fmt: skip
    pipe = NanoI2VPipeline(vae=AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]), transformer=transformer,
                           scheduler=NanoI2VFlowMatchScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path / "default")
    index = json.loads((tmp_path / "default" / "model_index.json").read_text())
    assert not (tmp_path / "default" / "text_encoder").exists() and index["text_encoder"] == [None, None]
    assert index["default_text_encoder"] == "all-MiniLM-L6-v2"
    assert pipe.text_encoder is text_encoder  # the pipeline in memory keeps it
    restored = NanoI2VPipeline.from_pretrained(tmp_path / "default")
    assert type(restored.text_encoder).__name__ == "BertModel" and restored.tokenizer is not None
    assert NanoI2VPipeline.from_pretrained(tmp_path / "default", text_encoder=None).text_encoder is None
    pipe.save_pretrained(tmp_path / "asked", save_text_encoder=True)
    assert any((tmp_path / "asked" / "text_encoder").glob("*.safetensors"))


def test_a_long_prompt_is_truncated_without_the_tokenizers_own_warning(assets, caplog):  # noqa: F811
    import transformers

    from nanoi2v_diffusers.text_encoders import encode_text, load_text_encoder

    text_encoder, tokenizer = load_text_encoder(str(assets["bert"]))
    tokenizer.model_max_length = 128
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            embeds, _ = encode_text(text_encoder, tokenizer, ["a red circle moves left " * 150], 32)
    finally:
        transformers.utils.logging.disable_propagation()
    assert embeds.shape[1] == 32
    assert "were truncated" in caplog.text and "Token indices sequence length" not in caplog.text


# ------------------------------------------------------------------------------------------- the README's commands


def _readme_training_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python training/train_") and "--config" in line]


TINY_RUN = ["--max_train_steps", "1", "--train_batch_size", "1", "--num_validation_samples", "1", "--validation_steps",
            "1", "--checkpointing_steps", "1", "--report_to", "none", "--lr_warmup_steps", "0"]  # fmt: skip


@pytest.mark.slow
def test_the_readmes_training_commands_run_from_a_fresh_clone(tmp_path, monkeypatch):
    """Each `python training/train_*.py --config ...` line of the README, with a tiny step count, as typed."""
    from nanoi2v_diffusers.data import ShapesConfig, write_shapes_folder
    from nanoi2v_diffusers.training import train_dit, train_vae

    commands = _readme_training_commands()
    assert {Path(shlex.split(line)[3]).name for line in commands} >= {"shapes_64.yaml", "shapes_64_lora.yaml",
                                                                        "vae_shapes_64.yaml"}  # fmt: skip
    write_shapes_folder(tmp_path / "data" / "videos", 2, config=ShapesConfig())
    monkeypatch.chdir(REPO)  # as the README runs them: paths relative to the repository root
    for index, line in enumerate(commands):
        script, *argv = shlex.split(line.split("#")[0])[1:]
        argv = [str(tmp_path / value) if value == "data/videos" else value for value in argv]
        main = train_vae.main if script.endswith("train_vae.py") else train_dit.main
        extra = ["--output_dir", str(tmp_path / f"run{index}"), *TINY_RUN]
        if script.endswith("train_vae.py"):
            extra += ["--num_sample_videos", "1", "--num_latent_stat_batches", "1"]
        else:
            extra += ["--validation_num_inference_steps", "1"]
        summary = main([*argv, *extra])
        assert summary["steps"] == 1, line
