"""Tests for NanoI2VTransformer3DModel: shapes, masking, adaLN-Zero init, checkpointing, I/O, LoRA, training."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoi2v_diffusers.conditioning import build_image_condition, num_condition_channels
from nanoi2v_diffusers.models.transformer_nanoi2v import (
    TRANSFORMER_PRESETS,
    ModulatedLayerNorm,
    NanoI2VFeedForward,
    NanoI2VRotaryPosEmbed,
    NanoI2VTransformer3DModel,
    QKRMSNorm,
    _RMSNorm,
    apply_rotary_emb,
    attend,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _measure  # noqa: E402  (the benchmarks' saved-activation counter, one implementation for both)

LATENT_CHANNELS = 4
TEXT_DIM = 24
TINY = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    ffn_dim=64,
    text_dim=TEXT_DIM,
    freq_dim=32,
    in_channels=LATENT_CHANNELS + num_condition_channels(LATENT_CHANNELS),
    out_channels=LATENT_CHANNELS,
)


def make_model(attention_type="full", trained=True, **overrides):
    """A tiny model; `trained=True` replaces the zero init by random weights so every path matters."""
    model = NanoI2VTransformer3DModel(**{**TINY, "attention_type": attention_type, **overrides})
    if trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not param.any():
                    param.normal_(std=0.2)
    return model.eval()


def public_config(model):
    """The config without private keys, tuples as lists (JSON round-trips tuples to lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def make_inputs(batch=2, frames=3, height=8, width=8, text_len=5):
    latents = torch.randn(batch, LATENT_CHANNELS, frames, height, width)
    image_latents = torch.randn(batch, LATENT_CHANNELS, 1, height, width)
    condition = build_image_condition(image_latents, frames)
    text = torch.randn(batch, text_len, TEXT_DIM)
    timestep = torch.rand(batch) * 1000
    return latents, timestep, text, condition


@pytest.mark.parametrize("attention_type", ["full", "factorized"])
@pytest.mark.parametrize("frames,height,width", [(1, 4, 4), (3, 8, 6), (5, 6, 10)])
def test_output_shape_matches_latents_for_any_grid(attention_type, frames, height, width):
    model = make_model(attention_type)
    latents, timestep, text, condition = make_inputs(frames=frames, height=height, width=width)
    with torch.no_grad():
        sample = model(latents, timestep, text, condition=condition).sample
        no_image = model(latents, timestep, text, condition=None).sample
    assert sample.shape == latents.shape and no_image.shape == latents.shape
    assert torch.isfinite(sample).all()
    # condition=None means "no image": the same as an explicit all-zero condition, and unlike an image.
    zero_condition = torch.zeros_like(condition)
    with torch.no_grad():
        explicit_zero = model(latents, timestep, text, condition=zero_condition).sample
    torch.testing.assert_close(no_image, explicit_zero)
    assert not torch.allclose(no_image, sample)


def test_return_dict_false_and_scalar_timestep():
    model = make_model()
    latents, _, text, condition = make_inputs()
    with torch.no_grad():
        (from_scalar,) = model(latents, 250.0, text, condition=condition, return_dict=False)
        from_batch = model(latents, torch.full((2,), 250.0), text, condition=condition).sample
    torch.testing.assert_close(from_scalar, from_batch)


@pytest.mark.parametrize("attention_type,num_text_refiner_layers", [("full", 0), ("factorized", 0), ("full", 1)])
def test_padding_tokens_with_mask_zero_do_not_change_output(attention_type, num_text_refiner_layers):
    model = make_model(attention_type, num_text_refiner_layers=num_text_refiner_layers)
    latents, timestep, text, condition = make_inputs(text_len=5)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # row 1 already has padding
    padded_text = torch.cat([text, 100 * torch.randn(2, 4, TEXT_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4)], dim=1)
    with torch.no_grad():
        short = model(latents, timestep, text, mask, condition=condition).sample
        padded = model(latents, timestep, padded_text, padded_mask, condition=condition).sample
        unmasked = model(latents, timestep, padded_text, None, condition=condition).sample
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(short, unmasked, atol=1e-3)  # the mask really is what hides the padding


@pytest.mark.parametrize("num_text_refiner_layers", [0, 1])
def test_all_padding_prompt_is_finite_and_ignores_padding_content(num_text_refiner_layers):
    model = make_model(num_text_refiner_layers=num_text_refiner_layers)
    latents, timestep, text, condition = make_inputs()
    mask = torch.ones(2, 5)
    mask[0] = 0  # row 0: unconditional, an all-padding prompt
    other_text = text.clone()
    other_text[0] = torch.randn(5, TEXT_DIM)
    with torch.no_grad():
        out = model(latents, timestep, text, mask, condition=condition).sample
        out_other_padding = model(latents, timestep, other_text, mask, condition=condition).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_other_padding)


def test_fresh_model_outputs_zeros_and_each_block_is_identity():
    model = make_model(trained=False)
    latents, timestep, text, condition = make_inputs()
    block_io = []
    hooks = [
        block.register_forward_hook(lambda mod, args, output: block_io.append((args[0], output)))
        for block in model.blocks
    ]
    with torch.no_grad():
        sample = model(latents, timestep, text, condition=condition).sample
    for hook in hooks:
        hook.remove()
    assert torch.equal(sample, torch.zeros_like(latents))
    assert len(block_io) == TINY["num_layers"]
    for block_input, block_output in block_io:
        assert block_input.abs().sum() > 0
        assert torch.equal(block_input, block_output)


def test_fresh_text_refiner_blocks_are_identity_and_trained_ones_mix_the_text():
    base = make_model()
    refined = NanoI2VTransformer3DModel(**{**TINY, "num_text_refiner_layers": 2}).eval()
    missing, unexpected = refined.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("text_refiner.") for key in missing)
    latents, timestep, text, condition = make_inputs()
    with torch.no_grad():
        expected = base(latents, timestep, text, condition=condition).sample
        torch.testing.assert_close(refined(latents, timestep, text, condition=condition).sample, expected)
        for param in refined.text_refiner.parameters():
            param.normal_(std=0.2)
        assert not torch.allclose(refined(latents, timestep, text, condition=condition).sample, expected, atol=1e-4)


@pytest.mark.parametrize("attention_type", ["full", "factorized"])
def test_gradient_checkpointing_gives_same_output_and_gradients(attention_type):
    model = make_model(attention_type).train()
    latents, timestep, text, condition = make_inputs()

    def loss_and_grads():
        model.zero_grad()
        loss = model(latents, timestep, text, condition=condition).sample.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, grads_ref = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_plain_autograd_switch_gives_the_same_output_and_gradients(monkeypatch):
    """SAVE_ACTIVATION_MEMORY=False (benchmarks/bench_train_gpu.py --plain_autograd) only changes what is kept."""
    import nanoi2v_diffusers.models.transformer_nanoi2v as transformer_module

    model = make_model("full").train()
    latents, timestep, text, condition = make_inputs()

    def loss_and_grads():
        model.zero_grad()
        loss = model(latents, timestep, text, condition=condition).sample.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (loss_ref, grads_ref), saved_ref = loss_and_grads(), _measure.saved_activation_bytes(
        lambda: model(latents, timestep, text, condition=condition).sample.sum(), exclude=list(model.parameters()))["total"]
    monkeypatch.setattr(transformer_module, "SAVE_ACTIVATION_MEMORY", False)
    (loss_plain, grads_plain), saved_plain = loss_and_grads(), _measure.saved_activation_bytes(
        lambda: model(latents, timestep, text, condition=condition).sample.sum(), exclude=list(model.parameters()))["total"]
    torch.testing.assert_close(loss_plain, loss_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_plain[name], grad, msg=name)
    assert saved_plain > saved_ref  # the switch really turned the memory-saving Functions off


def test_save_load_round_trip_is_identical(tmp_path):
    model = make_model("factorized", num_text_refiner_layers=1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    reloaded = NanoI2VTransformer3DModel.from_pretrained(tmp_path).eval()
    assert public_config(reloaded) == public_config(model)
    latents, timestep, text, condition = make_inputs()
    with torch.no_grad():
        expected = model(latents, timestep, text, condition=condition).sample
        assert torch.equal(reloaded(latents, timestep, text, condition=condition).sample, expected)


def test_lora_adapter_can_be_added_saved_and_loaded(tmp_path):
    from peft import LoraConfig

    base_state = make_model().state_dict()
    model = make_model()
    model.load_state_dict(base_state)
    inputs = make_inputs()
    with torch.no_grad():
        base_out = model(*inputs[:3], condition=inputs[3]).sample

    targets = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' default LoRA targets
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model.add_adapter(lora)
    with torch.no_grad():
        lora_out = model(*inputs[:3], condition=inputs[3]).sample
        half_scale = model(*inputs[:3], condition=inputs[3], attention_kwargs={"scale": 0.5}).sample
    assert not torch.allclose(lora_out, base_out)
    assert not torch.allclose(half_scale, lora_out)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)

    model.save_lora_adapter(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    fresh = make_model()
    fresh.load_state_dict(base_state)
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs[:3], condition=inputs[3]).sample, lora_out)


@pytest.mark.parametrize("attention_type", ["full", "factorized"])
def test_model_trains_on_a_fixed_batch(attention_type):
    torch.manual_seed(0)
    model = make_model(attention_type, trained=False).train()  # from the real (adaLN-Zero) init
    latents, timestep, text, condition = make_inputs()
    target = torch.randn_like(latents)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(latents, timestep, text, condition=condition).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_forward_on_cpu():
    model = make_model()
    inputs = make_inputs()
    with torch.no_grad():
        reference = model(*inputs[:3], condition=inputs[3]).sample
        model = model.to(torch.bfloat16)
        latents, timestep, text, condition = (x.to(torch.bfloat16) for x in inputs)
        sample = model(latents, timestep, text, condition=condition).sample
    assert sample.dtype == torch.bfloat16
    assert torch.isfinite(sample).all()
    relative_error = (sample.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05


def saved_activation_bytes(fn, *inputs):
    """Bytes of the distinct tensors autograd keeps for backward during `fn(*inputs)`, `fn`'s parameters excluded."""
    parameters = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return sum(_measure.saved_activation_bytes(lambda: fn(*inputs), exclude=parameters).values())


def reference_modulated_norm(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def test_modulated_layer_norm_matches_layer_norm_then_modulation_and_keeps_one_activation_less():
    norm = ModulatedLayerNorm(16, eps=1e-6)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    shift, scale = (torch.randn(2, 1, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(norm, (x, shift, scale))
    for inputs in ((x, shift, scale), (x, shift.detach(), scale.detach())):  # a frozen modulation too
        torch.testing.assert_close(norm(*inputs), reference_modulated_norm(*inputs), rtol=0, atol=1e-12)
        with torch.no_grad():  # sampling takes torch's ops: the same values
            torch.testing.assert_close(norm(*inputs), reference_modulated_norm(*inputs), rtol=0, atol=1e-12)
        leaves = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(norm(*inputs).square().sum(), leaves)
        expected = torch.autograd.grad(reference_modulated_norm(*inputs).square().sum(), leaves)
        for grad, reference in zip(grads, expected):
            torch.testing.assert_close(grad, reference)
    # Many tokens, so that the per-sample modulation and per-token statistics are small beside (B, N, dim).
    x = torch.randn(2, 256, 16, requires_grad=True)
    shift, scale = torch.randn(2, 1, 16), torch.randn(2, 1, 16, requires_grad=True)
    one_activation = x.numel() * x.element_size()
    ours = saved_activation_bytes(norm, x, shift, scale)
    composite = saved_activation_bytes(reference_modulated_norm, x, shift, scale)
    assert ours < 1.2 * one_activation < composite - 0.8 * one_activation, (ours, composite, one_activation)
    # bf16 input (the first block under autocast) with float32 modulation, as the model has it.
    x_bf16 = x.detach().bfloat16().requires_grad_()
    out = norm(x_bf16, shift, scale)
    out.sum().backward()
    assert out.dtype == torch.float32 and x_bf16.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.float32
    torch.testing.assert_close(out, reference_modulated_norm(x_bf16.float(), shift, scale), rtol=2e-2, atol=2e-2)


def test_qk_rms_norm_matches_torch_keeps_one_activation_less_and_keeps_bf16():
    norm = QKRMSNorm(16, eps=1e-6)
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    reference.load_state_dict(norm.state_dict())  # same parameter names: saved models load unchanged
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=0)
    grads = torch.autograd.grad(norm(x).sin().sum(), [x, norm.weight])
    expected = torch.autograd.grad(reference(x).sin().sum(), [x, reference.weight])
    for grad, reference_grad in zip(grads, expected):
        torch.testing.assert_close(grad, reference_grad)
    x64 = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    weight64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x64, weight64))
    one_activation = x.numel() * x.element_size()
    assert saved_activation_bytes(reference, x) - saved_activation_bytes(norm, x) >= one_activation
    # Under bf16 autocast the projections give bf16 queries while the weight stays float32.
    x_bf16 = x.detach().bfloat16().requires_grad_()
    out = norm(x_bf16)
    out.float().sum().backward()
    assert out.dtype == x_bf16.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference(x.detach()), rtol=2e-2, atol=2e-2)


def test_feed_forward_matches_diffusers_and_keeps_one_hidden_activation():
    from diffusers.models.attention import FeedForward

    ffn = NanoI2VFeedForward(16, 64)
    reference = FeedForward(16, inner_dim=64, activation_fn="gelu")
    reference.load_state_dict(ffn.state_dict())  # same weight names: saved models load unchanged
    x = torch.randn(2, 32, 16, requires_grad=True)
    torch.testing.assert_close(ffn(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), reference(x), rtol=0, atol=0)
    for model in (ffn, reference):
        model(x).sin().sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(reference(x).sin().sum(), x)[0] * 2)
    for (name, param), reference_param in zip(ffn.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, reference_param.grad, msg=name)
    hidden_activation = x.shape[0] * x.shape[1] * 64 * x.element_size()
    saving = saved_activation_bytes(reference, x) - saved_activation_bytes(ffn, x)
    assert saving == hidden_activation, (saving, hidden_activation)

    ffn64 = NanoI2VFeedForward(4, 8).double()
    x64 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ffn64, (x64,))

    # Under bf16 autocast: the product in bf16, gradients of the float32 weights in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = ffn(x.detach()), reference(x.detach())
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for model in (ffn, reference):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.detach()).float().sin().sum().backward()
    for param, reference_param in zip(ffn.parameters(), reference.parameters()):
        assert param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad, reference_param.grad, rtol=2e-2, atol=2e-2)

    # A hook on the output projection (DeepSpeed ZeRO-3 gathers its weights in one) must run: plain autograd.
    calls = []
    handle = ffn.net[2].register_forward_pre_hook(lambda module, args: calls.append(module))
    ffn(x).sum().backward()
    handle.remove()
    assert calls == [ffn.net[2]]

    # A LoRA layer in place of the output projection: plain autograd, so its own weights train.
    class Wrapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.base, self.extra = linear, torch.nn.Linear(64, 16, bias=False)

        def forward(self, h):
            return self.base(h) + self.extra(h)

    ffn.net[2] = Wrapped(ffn.net[2])
    ffn(x).sum().backward()
    assert ffn.net[2].extra.weight.grad is not None


def test_bf16_autocast_training_step_on_cpu():
    model = make_model().train()
    inputs = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample = model(*inputs[:3], condition=inputs[3]).sample
    sample.float().square().mean().backward()
    grads = [param.grad for param in model.parameters() if param.requires_grad]
    assert all(grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads)
    reference = make_model().train()
    reference.load_state_dict(model.state_dict())
    reference(*inputs[:3], condition=inputs[3]).sample.square().mean().backward()
    ours, expected = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (model, reference))
    assert (ours - expected).norm() / expected.norm() < 0.1


def test_blocks_compile_without_graph_breaks():
    model = make_model("factorized")
    inputs = make_inputs()
    with torch.no_grad():
        reference = model(*inputs[:3], condition=inputs[3]).sample
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(fullgraph=True, backend="eager")  # fullgraph raises on any graph break
    with torch.no_grad():
        compiled = model(*inputs[:3], condition=inputs[3]).sample
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, reference)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_blocks_compile_for_training_without_graph_breaks(autocast):
    """In training the adaLN norms, QK RMSNorm and feed-forward are autograd Functions: AOT autograd
    traces their backward too, also under autocast."""
    model = make_model().train()
    inputs = make_inputs()

    def gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sample = model(*inputs[:3], condition=inputs[3]).sample
        sample.float().square().mean().backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    reference = gradients()
    torch._dynamo.reset()
    try:
        for block in model.blocks:
            block.compile(fullgraph=True, backend="aot_eager")
        compiled = gradients()
    finally:
        torch._dynamo.reset()
    # bf16 results may round differently compiled (a sum of the key and value projections' input gradients in
    # another order): torch's bf16 tolerance there, float32's otherwise.
    tolerance = dict(rtol=1.6e-2, atol=1e-3) if autocast else {}
    for name, grad in reference.items():
        torch.testing.assert_close(compiled[name], grad, msg=name, **tolerance)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, c, t: (x[:, :3], c, t), r"out_channels=4 .*got 3"),
        (lambda x, c, t: (x[0], c, t), r"\(B, C, T, H, W\)"),
        (
            lambda x, c, t: (x[..., :7], c[..., :7], t),
            r"width \(W\) must be a positive multiple of 2 \(the patch size\); got 7, nearest valid is 8",
        ),
        (lambda x, c, t: (x, c[:, :2], t), r"condition must have shape"),
        (lambda x, c, t: (x, c, t[..., :5]), r"text_dim=24"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    model = make_model()
    latents, timestep, text, condition = make_inputs()
    latents, condition, text = change(latents, condition, text)
    with pytest.raises(ValueError, match=match):
        model(latents, timestep, text, condition=condition)


def test_bad_config_and_presets():
    with pytest.raises(ValueError, match="attention_type"):
        NanoI2VTransformer3DModel(**{**TINY, "attention_type": "windowed"})
    with pytest.raises(ValueError, match="attention_head_dim must be even.*nearest valid is 16"):
        NanoI2VTransformer3DModel(**{**TINY, "attention_head_dim": 15})
    with pytest.raises(ValueError, match="key 'num_text_refiner_layers' must be >= 0; got -1"):
        NanoI2VTransformer3DModel(**{**TINY, "num_text_refiner_layers": -1})
    with pytest.raises(ValueError, match="Unknown transformer preset"):
        NanoI2VTransformer3DModel.from_preset("XL")
    tiny = NanoI2VTransformer3DModel.from_preset("tiny", text_dim=TEXT_DIM, num_layers=1)
    assert tiny.config.num_layers == 1
    assert tiny.config.num_attention_heads == TRANSFORMER_PRESETS["tiny"]["num_attention_heads"]


def test_factorized_attention_equals_masked_full_attention():
    frames, per_frame, heads, dim = 3, 4, 2, 8
    q, k, v = (torch.randn(2, frames * per_frame, heads, dim) for _ in range(3))
    frame_of = torch.arange(frames * per_frame) // per_frame
    position_of = torch.arange(frames * per_frame) % per_frame

    def masked_full(same):
        mask = same[:, None] == same[None, :]
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask).transpose(1, 2)

    torch.testing.assert_close(attend(q, k, v, "spatial", frames), masked_full(frame_of))
    torch.testing.assert_close(attend(q, k, v, "temporal", frames), masked_full(position_of))
    torch.testing.assert_close(attend(q, k, v, "full", frames), masked_full(torch.zeros_like(frame_of)))
    for axes in ("full", "spatial", "temporal"):  # one head at a time (attention slicing): the same values
        torch.testing.assert_close(attend(q, k, v, axes, frames, slice_size=1), attend(q, k, v, axes, frames))


def test_rope_scores_depend_only_on_relative_position_and_tables_are_cached():
    head_dim = 16
    rope = NanoI2VRotaryPosEmbed(head_dim)
    grid = (4, 5, 6)
    cos, sin = rope(grid, torch.device("cpu"), torch.float32)
    assert cos.shape == (4 * 5 * 6, 1, head_dim)
    assert rope(grid, torch.device("cpu"), torch.float32)[0] is cos  # cached per grid

    def index(t, h, w):
        return (t * grid[1] + h) * grid[2] + w

    q, k = torch.randn(2, head_dim)

    def score(pos_q, pos_k):
        rq = apply_rotary_emb(q.view(1, 1, 1, -1), cos[index(*pos_q)], sin[index(*pos_q)])
        rk = apply_rotary_emb(k.view(1, 1, 1, -1), cos[index(*pos_k)], sin[index(*pos_k)])
        return (rq * rk).sum()

    offset = (1, 2, -1)
    first = score((0, 0, 3), tuple(a + b for a, b in zip((0, 0, 3), offset)))
    second = score((2, 1, 4), tuple(a + b for a, b in zip((2, 1, 4), offset)))
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, score((0, 0, 3), (0, 0, 3)))


def test_training_after_inference_mode_call():
    # RoPE tables made under torch.inference_mode cannot enter autograd; the cache must keep them apart.
    model = make_model().train()
    latents, timestep, text, condition = make_inputs()
    with torch.inference_mode():
        model(latents, timestep, text, condition=condition)
    model(latents, timestep, text, condition=condition).sample.square().mean().backward()
    assert model.proj_out.weight.grad is not None
