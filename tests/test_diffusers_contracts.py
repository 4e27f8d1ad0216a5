"""What diffusers' own model and pipeline contracts ask, checked on this package's classes: attention processors
and backends, QKV fusion, attention slicing, LoRA on diffusers' default target names, the attention-level step
caches, `encode_prompt` on its own, and checkpoints and LoRA files saved with the earlier fused projection names."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from nanoi2v_diffusers import NanoI2VPipeline, NanoI2VTransformer3DModel
from nanoi2v_diffusers.models.transformer_nanoi2v import NanoI2VAttention, NanoI2VAttnProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_pipeline  # noqa: E402  (its tiny pipeline; the module, so pytest does not collect its class twice)
from test_transformer import make_inputs, make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' own LoRA scripts' targets


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """test_pipeline's tiny pipeline and inputs (one BERT layer is enough here)."""
    from nanoi2v_diffusers.text_encoders import save_tiny_random_text_encoder

    case = test_pipeline.TestNanoI2VPipeline()
    case.text_encoder_dir = save_tiny_random_text_encoder(tmp_path_factory.mktemp("bert"),
                                                          hidden_size=test_pipeline.TEXT_DIM, num_layers=1)  # fmt: skip
    return case


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs[:3], condition=inputs[3]).sample


# ------------------------------------------------------------------------------------------- attention


def test_set_attention_backend_changes_the_backend_that_runs(monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    calls = []
    math_backend = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    # set_attention_backend also sets diffusers' process-wide default: put it back after the test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)

    def spy(*args, **kwargs):
        calls.append(True)
        return math_backend(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, spy)
    model, inputs = make_model(), make_inputs()
    default = _forward(model, inputs)
    assert not calls  # the default backend runs SDPA itself
    model.set_attention_backend("_native_math")
    assert {type(p) for p in model.attn_processors.values()} == {NanoI2VAttnProcessor}
    torch.testing.assert_close(_forward(model, inputs), default, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2 * model.config.num_layers  # every self- and cross-attention, each forward


def test_attention_processors_can_be_read_and_replaced(monkeypatch):
    model, inputs = make_model(attention_type="factorized"), make_inputs()
    expected = _forward(model, inputs)
    processors = model.attn_processors
    assert sorted(processors) == sorted(f"blocks.{i}.{name}.processor" for i in range(2)
                                        for name in ("attn1", "attn_temporal", "attn2"))  # fmt: skip
    seen = []

    class Recording(NanoI2VAttnProcessor):
        def __call__(self, attn, *args, **kwargs):
            seen.append(attn.is_cross_attention)
            return super().__call__(attn, *args, **kwargs)

    model.set_attn_processor({name: Recording() for name in processors})
    torch.testing.assert_close(_forward(model, inputs), expected)
    assert seen.count(True) == 2 and seen.count(False) == 4  # per block: one cross-attention, two self-attentions
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): Recording()})
    model.set_attn_processor(NanoI2VAttnProcessor())
    assert all(type(p) is NanoI2VAttnProcessor for p in model.attn_processors.values())


def test_fused_projections_give_the_same_output_and_unfuse_cleanly():
    model, inputs = make_model(num_text_refiner_layers=1), make_inputs()
    expected = _forward(model, inputs)
    model.fuse_qkv_projections()
    attention = [m for m in model.modules() if isinstance(m, NanoI2VAttention)]
    assert all(m.fused_projections for m in attention)
    assert all(hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in attention)
    torch.testing.assert_close(_forward(model, inputs), expected)
    model.unfuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") or m.fused_projections for m in attention)
    torch.testing.assert_close(_forward(model, inputs), expected)


def test_pipeline_attention_slicing_gives_the_same_video(case):
    pipe = case.get_pipe()
    expected = pipe(**case.get_dummy_inputs(output_type="latent")).frames
    pipe.enable_attention_slicing("max")
    assert {m.slice_size for m in pipe.transformer.modules() if isinstance(m, NanoI2VAttention)} == {1}
    torch.testing.assert_close(pipe(**case.get_dummy_inputs(output_type="latent")).frames, expected)
    pipe.disable_attention_slicing()
    assert {m.slice_size for m in pipe.transformer.modules() if isinstance(m, NanoI2VAttention)} == {None}



# ------------------------------------------------------------------------------------------- LoRA


def test_a_lora_on_diffusers_default_targets_reaches_self_and_cross_attention():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, inputs = make_model(), make_inputs()
    outputs = {}
    for name in ("attn1", "attn2"):
        getattr(model.blocks[0], name).register_forward_hook(lambda m, a, out, name=name: outputs.update({name: out}))
    _forward(model, inputs)
    before = dict(outputs)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_LORA_TARGETS, init_lora_weights=False))
    adapted = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    for block in range(model.config.num_layers):
        for attn in ("attn1", "attn2"):
            assert {f"blocks.{block}.{attn}.{target}" for target in DEFAULT_LORA_TARGETS} <= adapted
    _forward(model, inputs)
    for name in ("attn1", "attn2"):
        assert not torch.allclose(outputs[name], before[name], atol=1e-5), name


def _fused_lora_file(folder: Path, model: NanoI2VTransformer3DModel, rank: int = 2) -> dict:
    """A LoRA file as earlier versions wrote it (targets to_qkv, to_q, to_kv, to_out); returns its tensors."""
    torch.manual_seed(3)
    tensors, dim = {}, model.config.num_attention_heads * model.config.attention_head_dim
    for block in range(model.config.num_layers):
        for module, out_features in (("attn1.to_qkv", 3 * dim), ("attn1.to_out", dim), ("attn2.to_q", dim),
                                     ("attn2.to_kv", 2 * dim), ("attn2.to_out", dim)):  # fmt: skip
            prefix = f"transformer.blocks.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, dim) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank) * 0.1
    config = {"r": rank, "lora_alpha": rank, "target_modules": ["to_qkv", "to_q", "to_kv", "to_out"]}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "pytorch_lora_weights.safetensors", metadata=metadata)
    return tensors


def test_a_lora_file_saved_for_the_fused_projections_loads_converted_exactly(case, tmp_path):
    pipe = case.get_pipe()
    base = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    tensors = _fused_lora_file(tmp_path / "old-lora", pipe.transformer)
    pipe.load_lora_weights(tmp_path / "old-lora")
    pipe.fuse_lora()
    weights = dict(pipe.transformer.named_parameters())
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    for block in range(pipe.transformer.config.num_layers):
        old = f"transformer.blocks.{block}"
        qkv = tensors[f"{old}.attn1.to_qkv.lora_B.weight"] @ tensors[f"{old}.attn1.to_qkv.lora_A.weight"]
        kv = tensors[f"{old}.attn2.to_kv.lora_B.weight"] @ tensors[f"{old}.attn2.to_kv.lora_A.weight"]
        deltas = {"attn1.to_q": qkv[:dim], "attn1.to_k": qkv[dim : 2 * dim], "attn1.to_v": qkv[2 * dim :],
                  "attn2.to_k": kv[:dim], "attn2.to_v": kv[dim:]}  # fmt: skip
        for module, delta in deltas.items():
            name = f"blocks.{block}.{module}.weight"
            torch.testing.assert_close(weights.get(name, weights.get(name.replace(".weight", ".base_layer.weight"))),
                                       base[name] + delta, atol=1e-6, rtol=0)  # fmt: skip


# ------------------------------------------------------------------------------------------- old checkpoints


def _with_fused_names(state_dict: dict) -> dict:
    """A state dict as earlier versions saved it: fused to_qkv (self-attention), to_kv (cross-attention), to_out."""
    fused = {key.replace(".to_out.0.", ".to_out."): value for key, value in state_dict.items()}
    for prefix in {key.rsplit(".", 2)[0] for key in fused if ".to_q." in key}:  # one per attention module
        for leaf in ("weight", "bias"):
            names = ["to_k", "to_v"] if prefix.endswith(("attn2", "attn")) else ["to_q", "to_k", "to_v"]
            parts = [fused.pop(f"{prefix}.{name}.{leaf}") for name in names]
            fused[f"{prefix}.{'to_kv' if len(names) == 2 else 'to_qkv'}.{leaf}"] = torch.cat(parts)
    return fused


def test_a_training_checkpoint_with_the_fused_names_loads_through_load_state_dict():
    model, inputs = make_model(num_text_refiner_layers=1), make_inputs()
    fresh = make_model(num_text_refiner_layers=1, trained=False)
    fresh.load_state_dict(_with_fused_names(model.state_dict()))
    torch.testing.assert_close(_forward(fresh, inputs), _forward(model, inputs), rtol=0, atol=0)


def test_a_model_folder_saved_with_the_fused_names_loads_through_from_pretrained(tmp_path):
    """Folders of earlier versions (the first shipped model was one) load converted, to bit-identical outputs."""
    model, inputs = make_model(num_text_refiner_layers=1), make_inputs()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({key: value.contiguous() for key, value in _with_fused_names(load_file(str(weights))).items()},
              str(weights))  # fmt: skip
    assert any(".to_qkv." in key for key in load_file(str(weights)))
    loaded = NanoI2VTransformer3DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(_forward(loaded, inputs), _forward(model, inputs), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- caches


def _cache_config(kind: str, pipe):
    from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    # As diffusers' own cache tests: the first step (t = 1000) outside the skip range, the rest inside.
    if kind == "pyramid_attention_broadcast":
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                 spatial_attention_timestep_skip_range=(-1, 901),
                                                 current_timestep_callback=lambda: pipe.current_timestep)  # fmt: skip
        return config, _PYRAMID_ATTENTION_BROADCAST_HOOK
    config = FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
                               unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 901),
                               current_timestep_callback=lambda: pipe.current_timestep, tensor_format="BCFHW",
                               is_guidance_distilled=kind.endswith("distilled"))  # fmt: skip
    return config, _FASTER_CACHE_BLOCK_HOOK


@pytest.mark.parametrize("kind", ["pyramid_attention_broadcast", "faster_cache", "faster_cache_distilled"])
def test_attention_level_caches_register_their_hooks_skip_attention_and_change_the_video(case, kind):
    pipe = case.get_pipe()
    calls = []

    class Counting(NanoI2VAttnProcessor):
        def __call__(self, attn, *args, **kwargs):
            calls.append(attn.is_cross_attention)
            return super().__call__(attn, *args, **kwargs)

    pipe.transformer.set_attn_processor(Counting())
    inputs = dict(num_inference_steps=6, output_type="latent")
    expected = pipe(**case.get_dummy_inputs(**inputs)).frames
    uncached_calls, calls[:] = len(calls), []
    config, hook = _cache_config(kind, pipe)
    pipe.transformer.enable_cache(config)
    hooked = [name for name, m in pipe.transformer.named_modules() if getattr(m, "_diffusers_hook", None) is not None
              and m._diffusers_hook.get_hook(hook) is not None]  # fmt: skip
    assert hooked == [f"blocks.{i}.attn1" for i in range(pipe.transformer.config.num_layers)]  # spatial self-attention
    cached = pipe(**case.get_dummy_inputs(**inputs)).frames
    assert 0 < calls.count(False) < uncached_calls // 2  # some self-attention reused from earlier steps
    assert torch.isfinite(cached).all() and not torch.allclose(cached, expected, atol=1e-5)
    pipe.transformer.disable_cache()
    torch.testing.assert_close(pipe(**case.get_dummy_inputs(**inputs)).frames, expected, rtol=0, atol=0)


def test_faster_cache_refuses_a_batch_that_is_not_uncond_cond_before_any_work(case):
    pipe = case.get_pipe()
    pipe.transformer.enable_cache(_cache_config("faster_cache", pipe)[0])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    for overrides, named in (({"guidance_scale": 1.0}, "guidance_scale=1.0"),
                             ({"image_guidance_scale": 2.0}, "image_guidance_scale=2.0")):  # fmt: skip
        with pytest.raises(ValueError, match=f"FasterCache.*{named}"):
            pipe(**case.get_dummy_inputs(**overrides))
    assert not calls


# ------------------------------------------------------------------------------------------- encode_prompt


def test_encode_prompt_works_with_only_the_text_encoder_and_feeds_call_by_name(case):
    components = case.get_dummy_components()
    text_only = NanoI2VPipeline(vae=None, transformer=None, scheduler=None, text_encoder=components["text_encoder"],
                                tokenizer=components["tokenizer"])  # fmt: skip
    inputs = case.get_dummy_inputs()
    with torch.no_grad():
        outputs = text_only.encode_prompt(inputs.pop("prompt"), do_classifier_free_guidance=True)
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    without_text = NanoI2VPipeline(**{**components, "text_encoder": None, "tokenizer": None})
    without_text.set_progress_bar_config(disable=True)
    video = without_text(**inputs, **dict(zip(names, outputs))).frames
    full = NanoI2VPipeline(**components)
    full.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(video, full(**case.get_dummy_inputs()).frames, atol=1e-5)
