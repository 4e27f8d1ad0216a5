"""Bad input gets a clear error or a documented, logged fix-up (issue 8): pipeline, models, config files.

Cases already tested elsewhere are listed in README "Robustness" with their test; this module adds the rest.
"""

import json
import logging
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from nanoi2v_diffusers import AutoencoderKLNanoI2V, NanoI2VFlowMatchScheduler, NanoI2VPipeline, NanoI2VTransformer3DModel
from nanoi2v_diffusers.conditioning import num_condition_channels
from nanoi2v_diffusers.image_inputs import to_rgb_images
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import VAE_PRESETS
from nanoi2v_diffusers.safe_loading import ConfigValidationError
from nanoi2v_diffusers.text_encoders import load_text_encoder, save_tiny_random_text_encoder

SIZE = 32
FRAMES = 5
TEXT_DIM = 32
PROMPT = "a red circle moves left"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _tiny_transformer(latent_channels: int) -> NanoI2VTransformer3DModel:
    transformer = NanoI2VTransformer3DModel(
        in_channels=latent_channels + num_condition_channels(latent_channels), out_channels=latent_channels,
        num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=TEXT_DIM, freq_dim=32,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero starts at zero: random weights make every input matter
        for parameter in transformer.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return transformer.eval()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]).eval()
    text_encoder, tokenizer = load_text_encoder(
        str(save_tiny_random_text_encoder(tmp_path_factory.mktemp("bert"), hidden_size=TEXT_DIM))
    )
    pipeline = NanoI2VPipeline(vae=vae, transformer=_tiny_transformer(vae.config.latent_channels),
                               scheduler=NanoI2VFlowMatchScheduler(shift=3.0), text_encoder=text_encoder,
                               tokenizer=tokenizer)  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved_pipe(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(folder)
    return folder


def solid(color, height=SIZE, width=SIZE) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), color)


def run(pipe, **overrides):
    inputs = dict(image=solid(RED), prompt=PROMPT, num_frames=FRAMES, num_inference_steps=1, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    inputs.update(overrides)
    return pipe(**inputs).frames


class EncodeSpy:
    """Records the pixels the VAE encodes (the preprocessed conditioning images)."""

    def __init__(self, vae, monkeypatch):
        self.pixels = []
        original = vae.encode
        monkeypatch.setattr(vae, "encode", lambda x, *a, **k: self.pixels.append(x.clone()) or original(x, *a, **k))


def encoded_pixels(pipe, monkeypatch, image, height=SIZE, width=SIZE) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] that `encode_image` hands to the VAE for `image`."""
    spy = EncodeSpy(pipe.vae, monkeypatch)
    pipe.encode_image(image, height, width, batch_size=1, device="cpu", dtype=torch.float32)
    return spy.pixels[-1][:, :, 0]


def color_at(pixels: torch.Tensor, y: int, x: int) -> tuple:
    return tuple(round(v) for v in ((pixels[0, :, y, x] + 1) * 127.5).tolist())


# ------------------------------------------------------------------------------------------- sizes and counts


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_frames": 0}, r"1 \+ 4\*k .* got 0, nearest valid is 1"),
        ({"num_frames": 10}, r"got 10, nearest valid is 9"),
        ({"height": -32}, r"positive multiple of 16 .* got -32"),
        ({"width": 33}, r"got 33, nearest valid is 32"),
        ({"num_inference_steps": -1}, r"`num_inference_steps` must be an integer >= 1; got -1"),
        ({"num_inference_steps": 2.5}, r"`num_inference_steps` must be an integer >= 1; got 2.5"),
        ({"num_videos_per_prompt": 0}, r"`num_videos_per_prompt` must be an integer >= 1; got 0"),
        ({"max_sequence_length": 0}, r"`max_sequence_length` must be an integer >= 1; got 0"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be >= 1"),
        ({"image_guidance_scale": 0.0}, r"`image_guidance_scale` must be >= 1"),
        ({"latents": torch.full((1, 4, 2, 4, 4), float("inf"))}, "NaN or inf"),
    ],
)
def test_bad_sizes_counts_and_scales_raise(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": [PROMPT, 3]}, "`prompt` must be a str or a non-empty list of str"),
        ({"prompt": []}, "`prompt` must be a str or a non-empty list of str"),
        ({"negative_prompt": 7}, "`negative_prompt` must be a str or a non-empty list of str"),
        ({"prompt": [PROMPT, PROMPT], "negative_prompt": ["blurry"]}, "negative_prompt has 1 entries but prompt has 2"),
        ({"image": [solid(RED), solid(BLUE)], "prompt": PROMPT}, "`image`: 2 images for 1 prompts"),
        ({"image": "first_frame.png"}, "`image` must be a PIL image, a numpy array, a torch tensor"),
        ({"image": []}, "`image` is empty"),
    ],
)
def test_mismatched_batches_and_types_raise(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **overrides)


def test_one_image_per_prompt_and_one_image_for_all(pipe):
    one_each = run(pipe, image=[solid(RED), solid(BLUE)], prompt=[PROMPT, PROMPT],
                   generator=[torch.Generator().manual_seed(0) for _ in range(2)])  # fmt: skip
    shared = run(pipe, image=solid(RED), prompt=[PROMPT, PROMPT],
                 generator=[torch.Generator().manual_seed(0) for _ in range(2)])  # fmt: skip
    assert one_each.shape[0] == shared.shape[0] == 2
    torch.testing.assert_close(one_each[0], shared[0])  # same image, prompt and noise
    assert (one_each[1, :, 0] - shared[1, :, 0]).abs().max() > 1e-3  # blue vs red first latent frame


def test_default_size_is_the_image_size_rounded_to_a_valid_multiple(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        latents = run(pipe, image=solid(RED, height=40, width=70))
    assert latents.shape[-2:] == (48 // 8, 64 // 8)  # 40 -> 48, 70 -> 64 (multiples of 16)
    assert "rounded to multiples of 16" in caplog.text


# ------------------------------------------------------------------------------------------- text


def test_empty_prompt_means_no_text(pipe):
    empty = run(pipe, prompt="")
    none = run(pipe, prompt=None)
    torch.testing.assert_close(empty, none, atol=0, rtol=0)
    embeds, mask, _, _ = pipe.encode_prompt(["", PROMPT], do_classifier_free_guidance=False)
    assert mask[0].sum() == 0 and embeds[0].abs().sum() == 0 and mask[1].sum() > 0


def test_long_prompt_is_truncated_with_a_warning_in_a_full_call(pipe, caplog):
    long_prompt = " and ".join([PROMPT] * 10)
    with caplog.at_level(logging.WARNING):
        latents = run(pipe, prompt=long_prompt, max_sequence_length=8)
    assert "exceed max_sequence_length=8" in caplog.text and torch.isfinite(latents).all()
    truncated = " ".join(long_prompt.split()[:6])  # 8 tokens = [CLS] + 6 words + [SEP]
    torch.testing.assert_close(latents, run(pipe, prompt=truncated, max_sequence_length=8))


# ------------------------------------------------------------------------------------------- images


def _left_center_right(left, center, right, height=SIZE, width=2 * SIZE) -> PIL.Image.Image:
    """Outer quarters `left` / `right`, middle half `center`."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 4], pixels[:, width // 4 : 3 * width // 4], pixels[:, 3 * width // 4 :] = left, center, right
    return PIL.Image.fromarray(pixels)


@pytest.mark.parametrize("kind", ["pil", "float_array", "tensor"])
def test_other_aspect_ratio_is_center_cropped_not_stretched(pipe, monkeypatch, kind):
    wide = _left_center_right(RED, BLUE, RED)  # 32 x 64: a square crop keeps the blue middle only
    image = {"pil": wide, "float_array": np.asarray(wide) / 255.0,
             "tensor": torch.from_numpy(np.asarray(wide).copy()).permute(2, 0, 1) / 255.0}[kind]  # fmt: skip
    pixels = encoded_pixels(pipe, monkeypatch, image)
    assert pixels.shape == (1, 3, SIZE, SIZE)
    for x in (0, SIZE // 2, SIZE - 1):
        assert color_at(pixels, SIZE // 2, x) == BLUE, x
    tall = wide.transpose(PIL.Image.Transpose.ROTATE_90)  # 64 x 32: the crop cuts top and bottom
    assert color_at(encoded_pixels(pipe, monkeypatch, tall), 0, SIZE // 2) == BLUE


def test_rgba_is_composited_on_black_and_logged(pipe, monkeypatch, caplog):
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = RED  # red everywhere, but the right half fully transparent
    rgba[:, : SIZE // 2, 3] = 255
    with caplog.at_level(logging.WARNING):
        pixels = encoded_pixels(pipe, monkeypatch, PIL.Image.fromarray(rgba, "RGBA"))
    assert color_at(pixels, 0, 0) == RED and color_at(pixels, 0, SIZE - 1) == (0, 0, 0)
    assert "composited on black" in caplog.text
    caplog.clear()
    rgba[..., 3] = 255  # fully opaque: nothing to composite, nothing to log
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(np.asarray(to_rgb_images(PIL.Image.fromarray(rgba, "RGBA"))[0]), rgba[..., :3])
    assert "composited" not in caplog.text


@pytest.mark.parametrize("mode", ["LA", "PA", "P"])
def test_other_transparent_modes_are_composited_on_black(mode):
    rgba = PIL.Image.new("RGBA", (4, 4), WHITE + (0,))
    if mode == "P":
        image = PIL.Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        image.info["transparency"] = 1  # palette entry 1 (white) is transparent
    else:
        image = rgba.convert(mode)
    assert np.asarray(to_rgb_images(image)[0]).max() == 0


def test_grayscale_becomes_rgb_with_equal_channels(pipe, monkeypatch):
    gray = PIL.Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (SIZE, 1)), "L")
    pixels = encoded_pixels(pipe, monkeypatch, gray)
    assert pixels.shape[1] == 3 and torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 1], pixels[:, 2])
    torch.testing.assert_close(pixels, encoded_pixels(pipe, monkeypatch, gray.convert("RGB")), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["I;16", "I", "uint16_array"])
def test_16_bit_images_are_scaled_not_clipped(kind, caplog):
    ramp = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    image = {"I;16": PIL.Image.fromarray(ramp), "I": PIL.Image.fromarray(ramp).convert("I"), "uint16_array": ramp}[kind]
    if kind != "uint16_array":
        assert image.mode == kind
    with caplog.at_level(logging.WARNING):
        rgb = np.asarray(to_rgb_images(image)[0]).astype(int)
    expected = np.round(ramp / 65535 * 255).astype(int)
    assert np.array_equal(rgb[..., 0], expected)  # clipping would saturate every value above 255
    assert rgb.min() == 0 and rgb.max() == 255 and (rgb == 255).mean() < 0.01
    if kind != "uint16_array":
        assert "scaled to 8 bits" in caplog.text


def test_float_images_in_minus_one_one_equal_zero_one_and_batches_split():
    zero_one = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)
    as_01 = to_rgb_images(zero_one)
    as_pm1 = to_rgb_images(torch.from_numpy(zero_one * 2 - 1).permute(0, 3, 1, 2))
    assert len(as_01) == len(as_pm1) == 3
    for a, b in zip(as_01, as_pm1):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((8, 8, 3), 255.0), r"float images must be in \[0, 1\].*got values in \[255, 255\]"),
        (np.full((8, 8, 3), np.nan), "NaN or inf"),
        (np.zeros((8, 8, 3), np.int64), "uint8 .* or uint16 .*got int64"),
        (np.zeros((8, 8, 2), np.uint8), r"\(H, W, C\) .* got shape \(8, 8, 2\)"),
        (torch.zeros(2, 5, 8, 8), r"\(N, C, H, W\) .* got shape \(2, 5, 8, 8\)"),
    ],
)
def test_unusable_image_values_and_layouts_raise(image, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_images(image)


# ------------------------------------------------------------------------------------------- models


def test_transformer_timestep_and_mask_shapes_raise():
    model = _tiny_transformer(latent_channels=4)
    latents, condition = torch.zeros(2, 4, 1, 4, 4), torch.zeros(2, 5, 1, 4, 4)
    text = torch.zeros(2, 3, TEXT_DIM)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or \(B=2,\); got shape \(3,\)"):
        model(latents, torch.zeros(3), text, condition=condition)
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be \(B, L\) = \(2, 3\); got \(2, 4\)"):
        model(latents, torch.zeros(2), text, encoder_attention_mask=torch.ones(2, 4), condition=condition)


def test_vae_rank_errors_on_decode():
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"Expected latents \(B, C=4, T, H, W\); got shape \(4, 2, 2, 2\)"):
        vae.decode(torch.zeros(4, 2, 2, 2))


@torch.no_grad()
def test_float16_works_on_this_cpu_build(pipe):
    """torch 2.13's CPU kernels run the VAE and the transformer in float16 (slowly): no error, close to float32."""
    video = torch.rand(1, 3, FRAMES, SIZE, SIZE) * 2 - 1
    reference = pipe.vae(video).sample
    half_vae = AutoencoderKLNanoI2V.from_config(pipe.vae.config).eval()
    half_vae.load_state_dict(pipe.vae.state_dict())
    half = half_vae.to(torch.float16)(video.half()).sample
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=0.05, rtol=0.05)

    latents, condition = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 2, 4, 4)
    text, timestep = torch.randn(1, 3, TEXT_DIM), torch.tensor([500.0])
    reference = pipe.transformer(latents, timestep, text, condition=condition).sample
    half_transformer = NanoI2VTransformer3DModel.from_config(pipe.transformer.config).eval()
    half_transformer.load_state_dict(pipe.transformer.state_dict())
    half_transformer.to(torch.float16)
    half = half_transformer(latents.half(), timestep, text.half(), condition=condition.half()).sample
    torch.testing.assert_close(half.float(), reference, atol=0.02, rtol=0.02)


def test_float16_pipeline_runs_end_to_end_on_cpu(saved_pipe):
    half = NanoI2VPipeline.from_pretrained(saved_pipe, dtype=torch.float16)
    half.set_progress_bar_config(disable=True)
    frames = run(half, output_type="np")
    assert frames.shape == (1, FRAMES, SIZE, SIZE, 3) and np.isfinite(frames).all()
    assert frames.min() >= 0 and frames.max() <= 1


# ------------------------------------------------------------------------------------------- config files


def _edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("transformer/config.json", lambda c: c.pop("in_channels"), r"transformer/config.json: missing key 'in_channels'"),
        ("transformer/config.json", lambda c: c.update(num_layer=3), r"unknown key 'num_layer' \(did you mean 'num_layers'\?\)"),
        ("transformer/config.json", lambda c: c.update(num_layers="two"), r"key 'num_layers' must be int; got 'two'"),
        ("transformer/config.json", lambda c: c.update(patch_size=[1, 2]), r"key 'patch_size' must be Tuple\[int, int, int\]"),
        ("vae/config.json", lambda c: c.pop("latent_channels"), r"vae/config.json: missing key 'latent_channels'"),
        ("vae/config.json", lambda c: c.update(_class_name="AutoencoderKL"), r"key '_class_name' is 'AutoencoderKL'"),
        ("scheduler/scheduler_config.json", lambda c: c.update(shfit=3.0), r"scheduler_config.json: unknown key 'shfit'"),
        ("scheduler/scheduler_config.json", lambda c: c.update(shift="3"), r"key 'shift' must be float; got '3'"),
        ("model_index.json", lambda c: c.pop("vae"), r"model_index.json: missing component key 'vae'"),
        ("model_index.json", lambda c: c.update(_class_name="WanPipeline"), r"'_class_name' is 'WanPipeline'"),
        ("model_index.json", lambda c: c.update(extra=["diffusers", "DDIMScheduler"]), r"unknown component key 'extra'"),
        ("model_index.json", lambda c: c.update(transformer=["diffusers", "UNet2DModel"]),
         r"component 'transformer' is a UNet2DModel, but the pipeline needs a NanoI2VTransformer3DModel"),
        ("model_index.json", lambda c: c.update(vae=["diffusers", "NoSuchClass"]), r"cannot be imported"),
    ],
)
def test_tampered_or_incomplete_config_names_file_and_key(saved_pipe, tmp_path, file, change, message):
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    _edit_json(folder / file, change)
    with pytest.raises(ConfigValidationError, match=message):
        NanoI2VPipeline.from_pretrained(folder)


def test_config_saved_before_a_key_was_added_loads_with_its_default(saved_pipe, tmp_path):
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    _edit_json(folder / "transformer" / "config.json", lambda c: c.pop("num_text_refiner_layers"))
    pipe = NanoI2VPipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_text_refiner_layers == 0 and not pipe.transformer.text_refiner


def test_malformed_json_names_the_file(saved_pipe, tmp_path):
    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    (folder / "vae" / "config.json").write_text('{"in_channels": 3,')
    with pytest.raises(ConfigValidationError, match=r"vae/config.json is not valid JSON"):
        NanoI2VPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ConfigValidationError, match=r"model_index.json: expected a JSON object, got list"):
        NanoI2VPipeline.from_pretrained(folder)


def test_model_class_from_pretrained_validates_its_config(saved_pipe, tmp_path):
    folder = shutil.copytree(saved_pipe / "transformer", tmp_path / "transformer")
    assert NanoI2VTransformer3DModel.from_pretrained(folder).config.num_layers == 1  # untouched: loads
    _edit_json(folder / "config.json", lambda c: c.update(attention_type=3))
    with pytest.raises(ConfigValidationError, match=r"transformer/config.json: key 'attention_type' must be str; got 3"):
        NanoI2VTransformer3DModel.from_pretrained(folder)


def test_a_diffusers_scheduler_config_is_accepted(saved_pipe, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = shutil.copytree(saved_pipe, tmp_path / "pipe")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    _edit_json(folder / "model_index.json", lambda c: c.update(scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]))
    assert type(NanoI2VPipeline.from_pretrained(folder).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
