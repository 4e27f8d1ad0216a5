"""NanoI2VPipeline with tiny random components, following diffusers' pipeline-test layout."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import ModelCard

from nanoi2v_diffusers import (
    AutoencoderKLNanoI2V,
    NanoI2VFlowMatchScheduler,
    NanoI2VCondition,
    NanoI2VPipeline,
    NanoI2VPipelineOutput,
    NanoI2VTransformer3DModel,
)
from nanoi2v_diffusers import hub_utils
from nanoi2v_diffusers.conditioning import num_condition_channels
from nanoi2v_diffusers.data import ShapesConfig, generate_shapes_clip, read_video_frames
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import VAE_PRESETS
from nanoi2v_diffusers.data.shapes import CAPTION_CLAUSE_SEPARATOR
from nanoi2v_diffusers.safe_loading import ConfigValidationError
from nanoi2v_diffusers.text_encoders import encode_clauses, load_text_encoder, save_tiny_random_text_encoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SIZE = 32
FRAMES = 5
TEXT_DIM = 32
PROMPT = "a red circle moves left"


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """adaLN-Zero makes a fresh transformer output zeros; random weights make every input matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


def _add_random_lora(transformer: torch.nn.Module) -> None:
    """A PEFT LoRA adapter on every attention projection, randomly initialised so that it changes the output."""
    from peft import LoraConfig

    from nanoi2v_diffusers.training.train_dit import LORA_TARGET_MODULES

    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=False)
    )


class CallRecorder:
    """Wraps the transformer's forward to record what each call received."""

    def __init__(self, transformer):
        self.calls = []
        self._forward = transformer.forward
        transformer.forward = self

    def __call__(self, *args, **kwargs):
        self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return self._forward(*args, **kwargs)


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory):
    return save_tiny_random_text_encoder(tmp_path_factory.mktemp("tiny_bert"), hidden_size=TEXT_DIM)


class TestNanoI2VPipeline:
    pipeline_class = NanoI2VPipeline

    @pytest.fixture(autouse=True)
    def _text_encoder_dir(self, text_encoder_dir):
        self.text_encoder_dir = text_encoder_dir

    def get_dummy_components(self, scheduler=None):
        torch.manual_seed(0)
        vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]).eval()
        latent_channels = vae.config.latent_channels
        transformer = NanoI2VTransformer3DModel(
            in_channels=latent_channels + num_condition_channels(latent_channels),
            out_channels=latent_channels,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            ffn_dim=64,
            text_dim=TEXT_DIM,
            freq_dim=32,
        ).eval()
        _randomize(transformer, seed=1)
        text_encoder, tokenizer = load_text_encoder(str(self.text_encoder_dir))
        return {
            "vae": vae,
            "transformer": transformer,
            "scheduler": scheduler or NanoI2VFlowMatchScheduler(shift=3.0),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
        }

    def get_dummy_inputs(self, seed=0, **overrides):
        clip = generate_shapes_clip(seed=0, config=ShapesConfig(canvas_size=SIZE, num_frames=FRAMES))
        inputs = {
            "image": PIL.Image.fromarray(clip.first_frame),
            "prompt": PROMPT,
            "num_frames": FRAMES,
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "np",
        }
        inputs.update(overrides)
        return inputs

    def get_pipe(self, **component_overrides):
        components = self.get_dummy_components()
        components.update(component_overrides)
        pipe = self.pipeline_class(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ outputs

    @pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
    def test_output_types(self, output_type):
        pipe = self.get_pipe()
        frames = pipe(**self.get_dummy_inputs(output_type=output_type)).frames
        if output_type == "np":
            assert isinstance(frames, np.ndarray) and frames.shape == (1, FRAMES, SIZE, SIZE, 3)
            assert frames.min() >= 0.0 and frames.max() <= 1.0
        elif output_type == "pt":
            assert frames.shape == (1, FRAMES, 3, SIZE, SIZE)
        elif output_type == "pil":
            assert len(frames) == 1 and len(frames[0]) == FRAMES
            assert isinstance(frames[0][0], PIL.Image.Image) and frames[0][0].size == (SIZE, SIZE)
        else:
            latent_frames = (FRAMES - 1) // pipe.vae_scale_factor_temporal + 1
            latent_size = SIZE // pipe.vae_scale_factor_spatial
            expected = (1, pipe.transformer.config.out_channels, latent_frames, latent_size, latent_size)
            assert tuple(frames.shape) == expected

    def test_return_tuple(self):
        pipe = self.get_pipe()
        as_tuple = pipe(**self.get_dummy_inputs(), return_dict=False)
        as_output = pipe(**self.get_dummy_inputs())
        assert isinstance(as_tuple, tuple) and isinstance(as_output, NanoI2VPipelineOutput)
        np.testing.assert_array_equal(as_tuple[0], as_output.frames)

    def test_same_seed_same_video_other_seed_other_video(self):
        pipe = self.get_pipe()
        first = pipe(**self.get_dummy_inputs(seed=0)).frames
        again = pipe(**self.get_dummy_inputs(seed=0)).frames
        other = pipe(**self.get_dummy_inputs(seed=1)).frames
        np.testing.assert_array_equal(first, again)
        assert np.abs(first - other).max() > 1e-4

    def test_batch_equals_single_runs(self):
        pipe = self.get_pipe()
        prompts = [PROMPT, "the blue square moves up and to the right quickly"]
        image = self.get_dummy_inputs()["image"]
        batched = pipe(
            **self.get_dummy_inputs(
                image=[image, image],
                prompt=prompts,
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                output_type="latent",
            )
        ).frames
        for index, (prompt, seed) in enumerate(zip(prompts, (0, 1))):
            single = pipe(**self.get_dummy_inputs(prompt=prompt, seed=seed, output_type="latent")).frames
            torch.testing.assert_close(batched[index : index + 1], single, atol=1e-5, rtol=1e-4)

    def test_num_videos_per_prompt(self):
        pipe = self.get_pipe()
        frames = pipe(**self.get_dummy_inputs(num_videos_per_prompt=2)).frames
        assert frames.shape[0] == 2
        assert np.abs(frames[0] - frames[1]).max() > 1e-4

    def test_text_changes_the_video(self):
        pipe = self.get_pipe()
        left = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        right = pipe(**self.get_dummy_inputs(prompt="a red circle moves right", output_type="latent")).frames
        assert (left - right).abs().max() > 1e-4

    def test_first_frame_is_the_vae_round_trip_of_the_image(self):
        pipe = self.get_pipe()
        inputs = self.get_dummy_inputs(output_type="pt")
        frames = pipe(**inputs).frames  # (1, F, C, H, W) in [0, 1]
        pixels = pipe.video_processor.preprocess(inputs["image"], height=SIZE, width=SIZE).unsqueeze(2)
        with torch.no_grad():
            latent = pipe.vae.encode(pixels).latent_dist.mode()
            round_trip = pipe.vae.decode(latent).sample[:, :, 0]  # (1, C, H, W) in [-1, 1]
        torch.testing.assert_close(frames[:, 0], (round_trip / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)

    # ------------------------------------------------------------------ guidance

    def test_guidance_changes_output_and_one_equals_conditional_only(self):
        pipe = self.get_pipe()
        no_cfg = pipe(**self.get_dummy_inputs(guidance_scale=1.0, output_type="latent")).frames
        cfg = pipe(**self.get_dummy_inputs(guidance_scale=5.0, output_type="latent")).frames
        assert (no_cfg - cfg).abs().max() > 1e-4
        # With the negative branch made identical to the positive one, guidance has nothing to push
        # against: any scale must give the conditional-only velocity, i.e. the guidance-1 output.
        same_negative = pipe(
            **self.get_dummy_inputs(guidance_scale=5.0, negative_prompt=PROMPT, output_type="latent")
        ).frames
        torch.testing.assert_close(same_negative, no_cfg, atol=1e-5, rtol=1e-4)

    def test_cfg_is_one_batched_call_and_the_uncond_branch_sees_no_text(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)
        pipe(**self.get_dummy_inputs(guidance_scale=4.0))
        assert len(recorder.calls) == 2  # one call per step, both branches inside
        for call in recorder.calls:
            assert call["hidden_states"].shape[0] == 2
            uncond_mask, cond_mask = call["encoder_attention_mask"].chunk(2)  # [uncond, cond], as in diffusers
            assert cond_mask.sum() > 0 and uncond_mask.sum() == 0
            uncond_condition, cond_condition = call["condition"].chunk(2)
            torch.testing.assert_close(cond_condition, uncond_condition)  # the image is in both branches

    def test_guidance_one_runs_a_single_branch(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)
        pipe(**self.get_dummy_inputs(guidance_scale=1.0))
        assert all(call["hidden_states"].shape[0] == 1 for call in recorder.calls)

    def test_image_guidance_uses_three_branches(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)
        with_image_guidance = pipe(**self.get_dummy_inputs(image_guidance_scale=2.0, output_type="latent")).frames
        condition = recorder.calls[0]["condition"]
        assert condition.shape[0] == 3 and condition[0].abs().sum() == 0  # the first branch has no image
        assert condition[1:].abs().sum() > 0
        plain = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        assert (with_image_guidance - plain).abs().max() > 1e-5

    def test_negative_guidance_gets_its_own_branch_and_adds_linearly(self):
        pipe = self.get_pipe()
        negative = "a red circle moves right"

        def run(**overrides):
            inputs = self.get_dummy_inputs(num_inference_steps=1, output_type="latent", **overrides)
            return pipe(**inputs).frames

        recorder = CallRecorder(pipe.transformer)
        at = {scale: run(negative_prompt=negative, negative_guidance_scale=scale) for scale in (0.0, 1.0, 2.0)}
        masks = recorder.calls[0]["encoder_attention_mask"]  # branches: negative prompt, no text, prompt
        assert masks.shape[0] == 3 and masks[0].sum() > 0 and masks[1].sum() == 0 and masks[2].sum() > 0
        # Scale 0 is plain CFG against no text, whatever the negative prompt says ...
        torch.testing.assert_close(at[0.0], run(), atol=1e-5, rtol=1e-4)
        # ... and one Euler step is linear in the scale: the term is added, not mixed into CFG.
        assert (at[1.0] - at[0.0]).abs().max() > 1e-4
        torch.testing.assert_close(at[2.0] - at[0.0], 2 * (at[1.0] - at[0.0]), atol=1e-5, rtol=1e-4)
        # The term is v(prompt) - v(negative): nothing when the negative prompt is the prompt.
        same = run(negative_prompt=PROMPT, negative_guidance_scale=2.0)
        torch.testing.assert_close(same, run(), atol=1e-5, rtol=1e-4)

    # ------------------------------------------------------------------ modes

    def test_text_to_video_without_image(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)
        frames = pipe(**self.get_dummy_inputs(image=None, height=SIZE, width=SIZE)).frames
        assert frames.shape == (1, FRAMES, SIZE, SIZE, 3)
        assert all(call["condition"].abs().sum() == 0 for call in recorder.calls)

    def test_unconditional_sampling(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)
        frames = pipe(**self.get_dummy_inputs(image=None, prompt=None, guidance_scale=1.0, height=SIZE, width=SIZE)).frames
        assert frames.shape == (1, FRAMES, SIZE, SIZE, 3)
        assert all(call["encoder_attention_mask"].sum() == 0 for call in recorder.calls)

    def test_prompt_embeds_equal_prompt(self):
        pipe = self.get_pipe()
        embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        from_text = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        from_embeds = pipe(
            **self.get_dummy_inputs(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, output_type="latent")
        ).frames
        torch.testing.assert_close(from_text, from_embeds)

    def test_encode_prompt_alone(self):
        pipe = self.get_pipe()
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            [PROMPT, "a green triangle stays still"], num_videos_per_prompt=3
        )
        assert embeds.shape[0] == 6 and embeds.shape[-1] == TEXT_DIM and mask.shape == embeds.shape[:2]
        assert negative.shape[0] == 6 and negative_mask.sum() == 0

    def test_long_prompt_is_truncated_with_a_warning(self, caplog):
        pipe = self.get_pipe()
        long_prompt = " and ".join(["a red circle moves left"] * 20)
        embeds, mask, _, _ = pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False, max_sequence_length=16)
        assert embeds.shape[1] == 16
        assert "truncated" in caplog.text

    def test_heun_scheduler_calls_the_model_twice_per_step_but_the_last(self):
        pipe = self.get_pipe(scheduler=NanoI2VFlowMatchScheduler(shift=3.0, solver="heun"))
        recorder = CallRecorder(pipe.transformer)
        frames = pipe(**self.get_dummy_inputs(num_inference_steps=3)).frames
        assert len(recorder.calls) == len(pipe.scheduler.timesteps) == 2 * 3 - 1
        assert np.isfinite(frames).all()

    def test_diffusers_flow_match_euler_scheduler_swaps_in(self):
        pipe = self.get_pipe()
        ours = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        theirs = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    def test_attention_kwargs_scale_the_transformers_lora(self):
        pipe = self.get_pipe()
        base = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        _add_random_lora(pipe.transformer)
        with_lora = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        scaled_off = pipe(**self.get_dummy_inputs(output_type="latent"), attention_kwargs={"scale": 0.0}).frames
        assert not torch.allclose(with_lora, base, atol=1e-4)
        torch.testing.assert_close(scaled_off, base)
        assert pipe.attention_kwargs == {"scale": 0.0}

    def test_first_block_cache_skips_the_later_blocks_and_resets_between_calls(self):
        from diffusers.hooks import FirstBlockCacheConfig

        pipe = self.get_pipe()
        steps = 4
        reference = pipe(**self.get_dummy_inputs(num_inference_steps=steps, output_type="latent")).frames
        computed = []  # block indices, in order, each time a block really runs (not served from the cache)
        for index, block in enumerate(pipe.transformer.blocks):
            block.attn1.register_forward_hook(lambda *_, index=index: computed.append(index))

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuses
        cached = pipe(**self.get_dummy_inputs(num_inference_steps=steps, output_type="latent")).frames
        torch.testing.assert_close(cached, reference)
        assert computed == [0, 1] * steps
        pipe.transformer.disable_cache()

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # reuses at every step it can
        for _ in range(2):  # the second call must not start from the first call's cached residual
            computed.clear()
            cached = pipe(**self.get_dummy_inputs(num_inference_steps=steps, output_type="latent")).frames
            assert computed == [0, 1] + [0] * (steps - 1)
        assert not torch.allclose(cached, reference, atol=1e-4)

    @pytest.mark.parametrize("cache", ["mag", "taylorseer"])
    def test_other_block_caches_skip_steps_and_disable_cleanly(self, cache):
        from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

        steps = 8
        config = {
            "mag": MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps, threshold=0.5),
            "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                cache_identifiers=[r"^blocks\.\d+$"]),  # fmt: skip
        }[cache]
        pipe = self.get_pipe()
        def inputs():
            return self.get_dummy_inputs(num_inference_steps=steps, output_type="latent")

        reference = pipe(**inputs()).frames
        computed = []
        pipe.transformer.blocks[-1].attn1.register_forward_hook(lambda *_: computed.append(1))
        pipe.transformer.enable_cache(config)
        cached = pipe(**inputs()).frames
        assert 0 < len(computed) < steps and torch.isfinite(cached).all()
        pipe.transformer.disable_cache()
        torch.testing.assert_close(pipe(**inputs()).frames, reference)

    def test_current_timestep_is_the_step_being_denoised(self):
        pipe = self.get_pipe()
        seen = []

        def record(pipe, i, t, tensors):
            seen.append((pipe.current_timestep, t))
            return {}

        pipe(**self.get_dummy_inputs(num_inference_steps=3), callback_on_step_end=record)
        assert len(seen) == 3 and all(current is t for current, t in seen)
        assert pipe.current_timestep is None

    def test_lora_weights_save_load_fuse_and_unload_through_the_pipeline(self, tmp_path):
        from peft.utils import get_peft_model_state_dict

        pipe = self.get_pipe()
        base = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        _add_random_lora(pipe.transformer)
        with_lora = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        lora_layers = get_peft_model_state_dict(pipe.transformer)
        self.pipeline_class.save_lora_weights(tmp_path, transformer_lora_layers=lora_layers)
        assert [p.name for p in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]

        fresh = self.get_pipe()
        fresh.load_lora_weights(tmp_path, adapter_name="motion")
        assert fresh.get_active_adapters() == ["motion"]
        torch.testing.assert_close(fresh(**self.get_dummy_inputs(output_type="latent")).frames, with_lora)
        fresh.fuse_lora()
        torch.testing.assert_close(fresh(**self.get_dummy_inputs(output_type="latent")).frames, with_lora)
        fresh.unfuse_lora()
        fresh.unload_lora_weights()
        torch.testing.assert_close(fresh(**self.get_dummy_inputs(output_type="latent")).frames, base)
        with pytest.raises(ValueError, match="safetensors only"):
            fresh.load_lora_weights(tmp_path, use_safetensors=False)
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        torch.save({f"transformer.{k}": v for k, v in lora_layers.items()}, pickled / "pytorch_lora_weights.bin")
        with pytest.raises(OSError, match="pytorch_lora_weights.safetensors"):  # never unpickled
            fresh.load_lora_weights(pickled)

    def test_compiled_blocks_make_one_graph_for_all_blocks_and_steps(self):
        # The GPU recipe compiles the repeated blocks once. Anything a block specialises on that differs
        # between blocks or steps (a per-block Python attribute, a Python number taken from the
        # timestep) would recompile, which raises here. The eager backend traces and guards as
        # inductor does, without compiling kernels.
        from torch._dynamo.utils import counters

        pipe = self.get_pipe()
        reference = pipe(**self.get_dummy_inputs(num_inference_steps=3, output_type="latent")).frames
        torch._dynamo.reset()
        counters.clear()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = pipe(**self.get_dummy_inputs(num_inference_steps=3, output_type="latent")).frames
                pipe(**self.get_dummy_inputs(seed=1, num_inference_steps=4, output_type="latent"))
            assert counters["stats"]["unique_graphs"] == 1
        finally:
            torch._dynamo.reset()
        torch.testing.assert_close(compiled, reference)

    # ------------------------------------------------------------------ conditioning tasks

    def _clip(self, frames=9):
        return generate_shapes_clip(seed=2, config=ShapesConfig(canvas_size=SIZE, num_frames=frames))

    def _task_call(self, pipe, steps=2, **inputs):
        """Run a 9-frame call (3 latent frames); the transformer's calls are recorded."""
        recorder = CallRecorder(pipe.transformer)
        call = {"image": None, "num_frames": 9, "num_inference_steps": steps, "output_type": "latent", **inputs}
        latents = pipe(**self.get_dummy_inputs(**call)).frames
        return latents, recorder.calls

    def _one_frame_latent(self, pipe, frame):
        return pipe.encode_image(PIL.Image.fromarray(frame), SIZE, SIZE, 1, "cpu", torch.float32)[:, :, 0]

    def test_first_and_last_frame_condition_latent_frames_0_and_the_last(self):
        pipe, clip = self.get_pipe(), self._clip()
        latents, calls = self._task_call(pipe, image=clip.video[0], last_image=clip.video[-1])
        condition = calls[0]["condition"]  # (2, C + 1, 3, h, w): [no text, text], both with the frames
        channels = condition.shape[1] - 1
        assert condition[:, channels, :, 0, 0].tolist() == [[1, 0, 1]] * 2  # the mask
        last = self._one_frame_latent(pipe, clip.video[-1])  # the last frame encoded alone, as in training
        torch.testing.assert_close(condition[:, :channels, 2], last.expand(2, -1, -1, -1))
        first = self._one_frame_latent(pipe, clip.video[0])
        torch.testing.assert_close(condition[:, :channels, 0], first.expand(2, -1, -1, -1))
        assert not condition[:, :, 1].any()
        # The first frame's latent is put back at the end (the VAE is causal); the last frame's is not (a keyframe
        # encoded alone is not the clip's own last latent frame).
        torch.testing.assert_close(latents[:, :, 0], self._one_frame_latent(pipe, clip.video[0]))
        assert not torch.allclose(latents[:, :, 2], last)
        # With image=None the last frame alone.
        _, calls = self._task_call(pipe, last_image=clip.video[-1])
        assert calls[0]["condition"][:, channels, :, 0, 0].tolist() == [[0, 0, 1]] * 2

    def test_a_keyframe_goes_to_its_latent_frame_and_negative_indices_count_from_the_end(self):
        pipe, clip = self.get_pipe(), self._clip()
        for index in (4, -5):
            _, calls = self._task_call(pipe, conditions=[NanoI2VCondition(image=clip.video[4], frame_index=index)])
            condition = calls[0]["condition"]
            assert condition[:, -1, :, 0, 0].tolist() == [[0, 1, 0]] * 2
            torch.testing.assert_close(condition[:1, :-1, 1], self._one_frame_latent(pipe, clip.video[4]))

    def test_a_video_opens_the_output_with_its_own_latents(self):
        pipe, clip = self.get_pipe(), self._clip()
        with self.assert_logs_warning("continuing from its first 5 of 7 frames"):
            latents, calls = self._task_call(pipe, video=clip.video[:7])
        opening = pipe.encode_frames([[PIL.Image.fromarray(f) for f in clip.video[:5]]], SIZE, SIZE, 1, "cpu",
                                     torch.float32)  # (1, C, 2, h, w): the clip's first 2 latent frames  # fmt: skip
        assert calls[0]["condition"][:, -1, :, 0, 0].tolist() == [[1, 1, 0]] * 2
        torch.testing.assert_close(latents[:, :, :2], opening)  # exactly the given frames' latents, put back
        # The same video as a batch of one, and as a tensor (F, C, H, W): the same output.
        tensor = torch.from_numpy(clip.video[:5]).permute(0, 3, 1, 2)
        for video in ([clip.video[:5]], tensor):
            again, _ = self._task_call(pipe, video=video)
            torch.testing.assert_close(again, latents)

    def test_strength_drops_a_condition_after_its_share_of_the_steps(self):
        pipe, clip = self.get_pipe(), self._clip()
        conditions = [NanoI2VCondition(image=clip.video[0], strength=0.5),
                      NanoI2VCondition(image=clip.video[8], frame_index=8)]
        latents, calls = self._task_call(pipe, steps=4, conditions=conditions)
        masks = [call["condition"][0, -1, :, 0, 0].tolist() for call in calls]
        assert masks == [[1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]]  # ceil(0.5 * 4) = 2 calls see frame 0
        assert not torch.allclose(latents[:, :, 0], self._one_frame_latent(pipe, clip.video[0]))  # not put back

    def test_per_prompt_frames_and_a_shared_one(self):
        pipe, clips = self.get_pipe(), [self._clip(), generate_shapes_clip(seed=3, config=ShapesConfig(
            canvas_size=SIZE, num_frames=9))]  # fmt: skip
        _, calls = self._task_call(pipe, prompt=[PROMPT, PROMPT], image=[clip.video[0] for clip in clips],
                                   last_image=clips[0].video[-1])  # fmt: skip
        condition = calls[0]["condition"]  # (4, ...): [no text x 2, text x 2]
        assert not torch.allclose(condition[2, :-1, 0], condition[3, :-1, 0])  # each prompt its first frame
        torch.testing.assert_close(condition[2, :-1, 2], condition[3, :-1, 2])  # one last frame for both

    @pytest.mark.parametrize("inputs, message", [
        (lambda c: {"conditions": [NanoI2VCondition(image=c.video[0], frame_index=3)]},
         r"`conditions\[0\]` frame_index 3 \(pixel frame 3\) falls inside a latent frame.*nearest: 0 or 4"),
        (lambda c: {"last_image": c.video[0], "conditions": [NanoI2VCondition(image=c.video[0], frame_index=9)]},
         r"frame_index must be in \[-9, 8\]"),
        (lambda c: {"image": c.video[0], "last_image": c.video[1], "conditions": [NanoI2VCondition(image=c.video[1],
                    frame_index=-1)]}, r"`last_image` and `conditions\[0\]` both condition latent frame 2 \(pixel "
                                       r"frames 5-8\)"),
        (lambda c: {"video": c.video[:5], "conditions": [NanoI2VCondition(image=c.video[4], frame_index=4)]},
         r"`video` and `conditions\[0\]` both condition latent frame 1"),
        (lambda c: {"video": np.concatenate([c.video, c.video])},
         r"`video` has 18 frames, more than `num_frames` \(9\)"),
        (lambda c: {"image": c.video[0], "last_image": np.zeros((64, 64, 3), np.uint8)},
         r"Condition frames differ in size \(`image` 32x32, `last_image` 64x64\)"),
        (lambda c: {"conditions": [NanoI2VCondition(image=c.video[0], strength=1.5)]}, r"strength must be in \(0, 1\]"),
        (lambda c: {"conditions": [NanoI2VCondition(video=c.video[:5], frame_index=4)]},
         "a video, which starts at frame 0"),
        (lambda c: {"conditions": [NanoI2VCondition()]}, "needs an image or a video"),
        (lambda c: {"conditions": [c.video[0]]}, "must be a list of NanoI2VCondition"),
        (lambda c: {"prompt": [PROMPT] * 3, "last_image": [c.video[0]] * 2}, r"`last_image`: 2 images for 3 prompts"),
    ])  # fmt: skip
    def test_bad_conditions_are_refused_before_any_work(self, inputs, message):
        pipe, clip = self.get_pipe(), self._clip()
        recorder = CallRecorder(pipe.transformer)
        with pytest.raises(ValueError, match=message):
            self._task_call(pipe, **inputs(clip))
        assert not recorder.calls

    def test_continue_video_chains_calls_and_keeps_the_given_frames(self):
        pipe, clip = self.get_pipe(), self._clip()
        calls = CallRecorder(pipe.transformer).calls
        video = pipe.continue_video(clip.video[:5], prompt=PROMPT, num_frames_total=20, num_frames=9,
                                    num_inference_steps=1, generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert video.shape == (20, SIZE, SIZE, 3) and video.dtype == np.float32
        np.testing.assert_array_equal(video[:5], clip.video[:5] / np.float32(255))  # as given
        assert len(calls) == 4  # 15 more frames, 4 new per call (5 given of 9)
        with pytest.raises(ValueError, match="`context_frames` must be 1 \\+ 4m and below `num_frames` \\(9\\); got 7"):
            pipe.continue_video(clip.video[:5], num_frames_total=20, num_frames=9, context_frames=7)
        with pytest.raises(ValueError, match="must exceed the video's 5 frames"):
            pipe.continue_video(clip.video[:5], num_frames_total=5, num_frames=9)

    @staticmethod
    def assert_logs_warning(text):
        import contextlib
        import logging

        @contextlib.contextmanager
        def check():
            records = []
            handler = logging.Handler()
            handler.emit = records.append
            logger = logging.getLogger("nanoi2v_diffusers.pipelines.pipeline_nanoi2v")
            logger.addHandler(handler)
            try:
                yield
            finally:
                logger.removeHandler(handler)
            assert any(text in record.getMessage() for record in records), [r.getMessage() for r in records]

        return check()

    # ------------------------------------------------------------------ callbacks

    def test_callback_can_stop_early(self):
        pipe = self.get_pipe()
        recorder = CallRecorder(pipe.transformer)

        def stop_after_first_step(pipeline, step, timestep, tensors):
            pipeline._interrupt = True
            return tensors

        pipe(**self.get_dummy_inputs(num_inference_steps=4), callback_on_step_end=stop_after_first_step)
        assert len(recorder.calls) == 1

    def test_callback_can_edit_latents(self):
        pipe = self.get_pipe()
        seen = []

        def zero_latents(pipeline, step, timestep, tensors):
            seen.append(sorted(tensors))
            return {"latents": torch.zeros_like(tensors["latents"])}

        latents = pipe(
            **self.get_dummy_inputs(output_type="latent"),
            callback_on_step_end=zero_latents,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        ).frames
        assert seen[0] == ["latents", "prompt_embeds"]
        assert latents[:, :, 1:].abs().max() == 0  # frame 0 is the image latent, the rest was zeroed

    # ------------------------------------------------------------------ checks

    @pytest.mark.parametrize(
        "overrides, message",
        [
            ({"num_frames": 6}, r"1 \+ 4\*k .* got 6, nearest valid is 5"),
            ({"height": 40}, "multiple of 16 .* got 40, nearest valid is 48"),
            ({"width": 0}, "multiple of 16"),
            ({"width": 24.0}, "multiple of 16"),
            ({"num_inference_steps": 0}, "num_inference_steps"),
            ({"guidance_scale": 0.5}, "guidance_scale"),
            ({"output_type": "gif"}, "output_type"),
            ({"prompt": ["a", "b", "c"], "image": "two"}, "images for 3 prompts"),
            ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
            ({"prompt_embeds": torch.zeros(1, 2, TEXT_DIM)}, "either `prompt` or `prompt_embeds`"),
            ({"latents": torch.full((1, 4, 2, 4, 4), float("nan"))}, "NaN"),
            ({"latents": torch.zeros(1, 4, 3, 4, 4)}, "shape"),
            ({"negative_guidance_scale": 2.0}, "pass `negative_prompt` or `negative_prompt_embeds` too"),
            ({"negative_guidance_scale": -1.0, "negative_prompt": "x"}, "negative_guidance_scale` must be >= 0"),
        ],
    )
    def test_check_inputs(self, overrides, message):
        pipe = self.get_pipe()
        inputs = self.get_dummy_inputs(**overrides)
        if inputs["image"] == "two":
            inputs["image"] = [self.get_dummy_inputs()["image"]] * 2
        with pytest.raises(ValueError, match=message):
            pipe(**inputs)

    # ------------------------------------------------------------------ save / load / Hub

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipe()
        before = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        pipe.save_pretrained(tmp_path)
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["_class_name"] == "NanoI2VPipeline"
        assert index["vae"] == ["nanoi2v_diffusers.models.autoencoder_kl_nanoi2v", "AutoencoderKLNanoI2V"]
        for component in ("vae", "transformer"):
            assert (tmp_path / component / "diffusion_pytorch_model.safetensors").is_file()
            assert (tmp_path / component / "config.json").is_file()
        assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
        assert not list(tmp_path.rglob("*.bin"))

        loaded = NanoI2VPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        after = loaded(**self.get_dummy_inputs(output_type="latent")).frames
        torch.testing.assert_close(before, after, atol=0, rtol=0)

    def test_text_clause_separator_is_saved_and_used_to_encode_prompts(self, tmp_path):
        pipe = self.get_pipe(text_clause_separator=CAPTION_CLAUSE_SEPARATOR)
        prompt = "the red circle moves up and to the left and a blue square moves down"
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        expected, expected_mask = encode_clauses(pipe.text_encoder, pipe.tokenizer, [prompt], 64,
                                                 CAPTION_CLAUSE_SEPARATOR)  # fmt: skip
        torch.testing.assert_close(embeds, expected)
        assert torch.equal(mask, expected_mask)
        plain, _, _, _ = self.get_pipe().encode_prompt(prompt, do_classifier_free_guidance=False)
        assert plain.shape != embeds.shape or not torch.allclose(plain, embeds)  # two [CLS]/[SEP] pairs, other states

        pipe.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "model_index.json").read_text())["text_clause_separator"] == CAPTION_CLAUSE_SEPARATOR
        loaded = NanoI2VPipeline.from_pretrained(tmp_path)
        assert loaded.config.text_clause_separator == CAPTION_CLAUSE_SEPARATOR
        torch.testing.assert_close(loaded.encode_prompt(prompt, do_classifier_free_guidance=False)[0], embeds)

    def test_bad_text_clause_separator_is_refused_at_construction_and_load(self, tmp_path):
        with pytest.raises(ValueError, match="capturing groups"):
            self.get_pipe(text_clause_separator="( and )")
        self.get_pipe().save_pretrained(tmp_path)
        index_path = tmp_path / "model_index.json"
        index = json.loads(index_path.read_text())
        assert index["text_clause_separator"] is None
        index_path.write_text(json.dumps({**index, "text_clause_separator": 3}))
        with pytest.raises(ConfigValidationError, match="'text_clause_separator' must be"):
            NanoI2VPipeline.from_pretrained(tmp_path)

    def test_from_pretrained_with_dtype_and_component_override(self, tmp_path):
        self.get_pipe().save_pretrained(tmp_path)
        loaded = NanoI2VPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert loaded.transformer.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16
        other_scheduler = NanoI2VFlowMatchScheduler(shift=1.0, solver="heun")
        overridden = NanoI2VPipeline.from_pretrained(tmp_path, scheduler=other_scheduler)
        assert overridden.scheduler is other_scheduler

    def test_saved_without_text_encoder_takes_one_at_load(self, tmp_path):
        components = self.get_dummy_components()
        text_encoder, tokenizer = components.pop("text_encoder"), components.pop("tokenizer")
        NanoI2VPipeline(**components).save_pretrained(tmp_path)
        bare = NanoI2VPipeline.from_pretrained(tmp_path)
        assert bare.text_encoder is None
        bare.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="no text_encoder"):
            bare(**self.get_dummy_inputs())
        full = NanoI2VPipeline.from_pretrained(tmp_path, text_encoder=text_encoder, tokenizer=tokenizer)
        full.set_progress_bar_config(disable=True)
        assert full(**self.get_dummy_inputs()).frames.shape == (1, FRAMES, SIZE, SIZE, 3)

    def test_command_line_loader_overrides_only_the_solver_and_shift(self, tmp_path):
        from nanoi2v_diffusers.cli import load_pipeline

        self.get_pipe(scheduler=NanoI2VFlowMatchScheduler(shift=2.0, num_train_timesteps=500)).save_pretrained(tmp_path)
        saved = load_pipeline(str(tmp_path)).scheduler.config
        assert (saved.solver, saved.shift) == ("euler", 2.0)
        changed = load_pipeline(str(tmp_path), solver="heun", shift=3.0).scheduler.config
        assert (changed.solver, changed.shift, changed.num_train_timesteps) == ("heun", 3.0, 500)

    def test_command_line_loader_adds_lora_weights_at_their_scale(self, tmp_path):
        from peft.utils import get_peft_model_state_dict

        from nanoi2v_diffusers.cli import load_pipeline

        pipe = self.get_pipe()
        pipe.save_pretrained(tmp_path / "base")
        base = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        _add_random_lora(pipe.transformer)
        with_lora = pipe(**self.get_dummy_inputs(output_type="latent")).frames
        pipe.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
        for scale, expected in ((1.0, with_lora), (0.0, base)):
            loaded = load_pipeline(str(tmp_path / "base"), lora=str(tmp_path / "lora"), lora_scale=scale)
            loaded.set_progress_bar_config(disable=True)
            torch.testing.assert_close(loaded(**self.get_dummy_inputs(output_type="latent")).frames, expected)

    def test_ship_model_writes_float16_that_loads_as_float32(self, tmp_path, monkeypatch):
        from safetensors import safe_open

        monkeypatch.syspath_prepend(str(EXAMPLES))
        from ship_model import ship

        components = self.get_dummy_components()
        del components["text_encoder"], components["tokenizer"]
        NanoI2VPipeline(**components).save_pretrained(tmp_path / "trained")
        (tmp_path / "trained" / "README.md").write_text("model card")
        (tmp_path / "trained" / "checkpoint-10").mkdir()
        ship(tmp_path / "trained", tmp_path / "shipped")
        with safe_open(str(tmp_path / "shipped" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
        assert (tmp_path / "shipped" / "README.md").read_text() == "model card"
        assert not (tmp_path / "shipped" / "checkpoint-10").exists()
        shipped = NanoI2VPipeline.from_pretrained(tmp_path / "shipped")
        assert shipped.transformer.dtype == torch.float32
        for name, param in shipped.transformer.named_parameters():
            original = components["transformer"].get_parameter(name)
            torch.testing.assert_close(param, original.half().float(), atol=0, rtol=0)

    def test_ship_model_swaps_in_a_decoder_fine_tune_only(self, tmp_path, monkeypatch):
        monkeypatch.syspath_prepend(str(EXAMPLES))
        from ship_model import ship

        components = self.get_dummy_components()
        del components["text_encoder"], components["tokenizer"]
        NanoI2VPipeline(**components).save_pretrained(tmp_path / "trained")
        vae = components["vae"]
        with torch.no_grad():
            vae.decoder.conv_out.conv.bias.add_(0.25)
        vae.save_pretrained(tmp_path / "decoder_tuned")
        (tmp_path / "trained" / "README.md").write_text("model card\n")
        ship(tmp_path / "trained", tmp_path / "shipped", vae=tmp_path / "decoder_tuned")
        assert (tmp_path / "shipped" / "README.md").read_text().startswith("model card\n")
        assert "decoder_tuned" in (tmp_path / "shipped" / "README.md").read_text()
        # Re-shipping a shipped folder with a newer decoder names only the newer one.
        vae.save_pretrained(tmp_path / "decoder_tuned_again")
        ship(tmp_path / "shipped", tmp_path / "reshipped", vae=tmp_path / "decoder_tuned_again")
        card = (tmp_path / "reshipped" / "README.md").read_text()
        assert card.startswith("model card\n") and card.count("The VAE in this folder") == 1
        assert "decoder_tuned_again" in card
        shipped = NanoI2VPipeline.from_pretrained(tmp_path / "shipped").vae
        torch.testing.assert_close(shipped.decoder.conv_out.conv.bias, vae.decoder.conv_out.conv.bias.half().float())
        with torch.no_grad():
            vae.encoder.conv_in.conv.bias.add_(0.25)
        vae.save_pretrained(tmp_path / "other_encoder")
        with pytest.raises(ValueError, match="another encoder"):
            ship(tmp_path / "trained", tmp_path / "refused", vae=tmp_path / "other_encoder")

    def test_model_card_and_push_to_hub(self, tmp_path, monkeypatch):
        pipe = self.get_pipe()
        pipe.save_pretrained(tmp_path)
        written = (tmp_path / "README.md").read_text()  # save_pretrained writes a card with a real description
        assert "A causal 3D VAE with 4 latent channels" in written and "2 layers of width 32" in written
        assert f'NanoI2VPipeline.from_pretrained("{tmp_path.name}")' in written and str(tmp_path.parent) not in written
        (tmp_path / "README.md").unlink()
        sample = tmp_path.parent / "sample.gif"
        sample.write_bytes(b"GIF89a")
        with pytest.raises(ValueError, match="README.md"):
            hub_utils.check_pipeline_folder(tmp_path)
        hub_utils.write_model_card(
            tmp_path,
            repo_id="user/nanoi2v-test",
            datasets=["shapes"],
            training_config={"learning_rate": 1e-4, "max_train_steps": 10},
            metrics={"direction_accuracy": 0.5},
            sample_videos=[sample],
        )
        card = ModelCard.load(tmp_path / "README.md")
        assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-video"
        assert "nanoi2v" in card.data.tags and card.data.license == "apache-2.0"
        assert "NanoI2VPipeline.from_pretrained(\"user/nanoi2v-test\")" in card.text
        assert "learning_rate" in card.text and "direction_accuracy" in card.text
        assert (tmp_path / "samples" / "sample.gif").is_file()

        calls = {}
        monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: calls.setdefault("create", repo_id))
        monkeypatch.setattr(hub_utils, "upload_folder", lambda **kw: calls.setdefault("upload", kw) and "commit-url")
        hub_utils.push_to_hub(tmp_path, "user/nanoi2v-test")
        assert calls["create"] == "user/nanoi2v-test"
        assert calls["upload"]["folder_path"] == str(tmp_path) and calls["upload"]["repo_id"] == "user/nanoi2v-test"

    def test_model_card_usage_snippet_runs_as_written(self, tmp_path, monkeypatch):
        self.get_pipe().save_pretrained(tmp_path / "my-model")
        card = (tmp_path / "my-model" / "README.md").read_text()
        snippet = card.split("```python\n")[1].split("```")[0]
        clip = generate_shapes_clip(seed=0, config=ShapesConfig(canvas_size=SIZE, num_frames=FRAMES))
        PIL.Image.fromarray(clip.first_frame).save(tmp_path / "first_frame.png")
        monkeypatch.chdir(tmp_path)  # beside the folder, as a card's reader runs it
        exec(compile(snippet, "README.md", "exec"), {})
        assert read_video_frames(tmp_path / "out.mp4").shape == (17, SIZE, SIZE, 3)

    def test_card_metadata_takes_hub_ids_only(self, tmp_path):
        self.get_pipe().save_pretrained(tmp_path / "lora")
        card = hub_utils.write_model_card(tmp_path / "lora", datasets=["user/clips", str(tmp_path / "videos")],
                                          base_model=str(tmp_path / "base"), training_config={"out": str(tmp_path)})
        assert card.data.datasets == ["user/clips"] and card.data.base_model is None
        assert "local pipeline folder `base`" in card.text and "local data: `videos`" in card.text
        assert str(tmp_path) not in str(card)

    def test_push_to_hub_offline_says_why_and_that_the_folder_is_kept(self, tmp_path, monkeypatch):
        self.get_pipe().save_pretrained(tmp_path)

        def unreachable(repo_id, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

        monkeypatch.setattr(hub_utils, "create_repo", unreachable)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with pytest.raises(RuntimeError, match=r"could not be reached \(ConnectionError\); check the network.*saved locally"):
            hub_utils.push_to_hub(tmp_path, "user/repo")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
            hub_utils.push_to_hub(tmp_path, "user/repo")

    def test_push_refuses_pickle_weights(self, tmp_path):
        self.get_pipe().save_pretrained(tmp_path)
        hub_utils.write_model_card(tmp_path)
        (tmp_path / "transformer" / "pytorch_model.bin").write_bytes(b"\x80\x04")
        with pytest.raises(ValueError, match="pickle"):
            hub_utils.check_pipeline_folder(tmp_path)
