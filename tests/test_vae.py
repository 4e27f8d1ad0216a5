import pytest
import torch
import torch.nn.functional as F

from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import _tiled_apply

# fp32 agreement between two computations of the same function (chunked vs whole, sliced vs batched).
ATOL = 1e-5


def tiny_vae(**overrides) -> AutoencoderKLNanoI2V:
    return AutoencoderKLNanoI2V(**{**VAE_PRESETS["tiny"], **overrides}).eval()


def video(batch=1, frames=9, height=16, width=16) -> torch.Tensor:
    return torch.rand(batch, 3, frames, height, width) * 2 - 1


def latents_of(vae, x) -> torch.Tensor:
    return vae.encode(x).latent_dist.mode()


@pytest.fixture
def vae():
    return tiny_vae()


def test_default_compression_ratios(vae):
    assert vae.spatial_compression_ratio == 8
    assert vae.temporal_compression_ratio == 4
    two_levels = tiny_vae(block_out_channels=(8, 16), temporal_downsample=(True,))
    assert (two_levels.spatial_compression_ratio, two_levels.temporal_compression_ratio) == (2, 2)


@pytest.mark.parametrize("frames", [1, 5, 17, 33])
@pytest.mark.parametrize("height, width", [(8, 8), (16, 24), (32, 16)])
@torch.no_grad()
def test_shapes(vae, frames, height, width):
    x = video(2, frames, height, width)
    posterior = vae.encode(x).latent_dist
    expected = (2, 4, 1 + (frames - 1) // 4, height // 8, width // 8)
    assert posterior.mean.shape == expected and posterior.logvar.shape == expected
    assert vae.decode(posterior.mode()).sample.shape == x.shape
    assert vae(x).sample.shape == x.shape


def test_return_dict_false_gives_tuples(vae):
    x = video(frames=5)
    with torch.no_grad():
        (posterior,) = vae.encode(x, return_dict=False)
        (sample,) = vae.decode(posterior.mode(), return_dict=False)
        (forward_sample,) = vae(x, return_dict=False)
    torch.testing.assert_close(sample, forward_sample)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 16, 16, 16), r"num_frames must be 1 \+ 4\*k .* got 16, nearest valid is 17"),
        ((1, 3, 3, 16, 16), r"got 3, nearest valid is (1|5)"),
        ((1, 3, 11, 16, 16), r"got 11, nearest valid is 9"),
        ((1, 3, 5, 30, 16), r"height must be a positive multiple of 8; got 30, nearest valid is 32"),
        ((1, 3, 5, 16, 4), r"width must be a positive multiple of 8; got 4, nearest valid is 8"),
        ((1, 4, 5, 16, 16), r"Expected a video \(B, C=3, T, H, W\)"),
        ((3, 5, 16, 16), r"Expected a video"),
    ],
)
def test_bad_video_sizes_raise(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_bad_latents_raise(vae):
    with pytest.raises(ValueError, match=r"Expected latents \(B, C=4"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temporal_downsample=(True, True)), "one flag per downsampling step"),
        (dict(norm_num_groups=3), "divisible by norm_num_groups=3"),
        (dict(latents_mean=(0.0, 0.0)), "latents_mean needs latent_channels=4 values"),
        (dict(latents_std=(1.0, 1.0, 0.0, 1.0)), "latents_std must be positive"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_vae(**kwargs)


@pytest.mark.parametrize("framewise", [True, False])
@torch.no_grad()
def test_encoding_is_causal(vae, framewise):
    vae.use_framewise_encoding = framewise
    x = video(frames=17)
    latents = latents_of(vae, x)
    # The image alone is exactly the first latent frame; a prefix gives a prefix.
    torch.testing.assert_close(latents_of(vae, x[:, :, :1]), latents[:, :, :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(latents_of(vae, x[:, :, :9]), latents[:, :, :3], atol=ATOL, rtol=0)
    # Changing the future (frames 9+, i.e. latent frames 3+) leaves earlier latents unchanged ...
    changed = x.clone()
    changed[:, :, 9:] = -changed[:, :, 9:]
    changed_latents = latents_of(vae, changed)
    torch.testing.assert_close(changed_latents[:, :, :3], latents[:, :, :3], atol=ATOL, rtol=0)
    # ... and does change the later ones (so the check above is not vacuous).
    assert (changed_latents[:, :, 3:] - latents[:, :, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("framewise", [True, False])
@torch.no_grad()
def test_decoding_is_causal(vae, framewise):
    vae.use_framewise_decoding = framewise
    z = torch.randn(1, 4, 5, 2, 2)
    full = vae.decode(z).sample  # (1, 3, 17, 16, 16)
    torch.testing.assert_close(vae.decode(z[:, :, :1]).sample, full[:, :, :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.decode(z[:, :, :3]).sample, full[:, :, :9], atol=ATOL, rtol=0)


@torch.no_grad()
def test_chunked_equals_whole_clip(vae):
    x = video(2, frames=17, height=16, width=24)
    chunked_latents, chunked_video = latents_of(vae, x), vae(x).sample
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.testing.assert_close(latents_of(vae, x), chunked_latents, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae(x).sample, chunked_video, atol=ATOL, rtol=0)


def test_chunking_is_used_without_autograd_only(vae):
    calls = []
    vae.decoder.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        vae.decode(z)
    assert len(calls) == 3  # one latent frame per call
    calls.clear()
    vae.decode(z)  # with autograd: whole clip (chunks would keep every activation anyway)
    assert len(calls) == 1


@torch.no_grad()
def test_sliced_equals_batched(vae):
    x = video(3, frames=5)
    batched_latents, batched_video = latents_of(vae, x), vae(x).sample
    vae.enable_slicing()
    torch.testing.assert_close(latents_of(vae, x), batched_latents, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae(x).sample, batched_video, atol=ATOL, rtol=0)


def test_tile_blending_reassembles_a_local_operation_exactly():
    # Nearest-neighbour 8x upsampling is local, so blended tiles must give exactly the untiled result:
    # this checks tile placement, edge tiles and the normalisation of the blending weights.
    z = torch.randn(1, 2, 3, 13, 11)
    upsample = lambda t: t.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)  # noqa: E731
    tiled = _tiled_apply(upsample, z, tile=(4, 4), stride=(3, 2), in_scale=1, out_scale=8)
    torch.testing.assert_close(tiled, upsample(z), atol=1e-6, rtol=0)
    downsample = lambda t: F.avg_pool3d(t, (1, 8, 8))  # noqa: E731
    x = torch.randn(1, 2, 3, 96, 80)
    torch.testing.assert_close(_tiled_apply(downsample, x, (4, 4), (2, 3), 8, 1), downsample(x), atol=1e-6, rtol=0)


@torch.no_grad()
def test_tiling_is_off_when_the_frame_fits_in_one_tile(vae):
    x = video(frames=5, height=32, width=32)
    reference = vae(x).sample
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)  # fmt: skip
    torch.testing.assert_close(vae(x).sample, reference, atol=0, rtol=0)


@torch.no_grad()
def test_tiled_decode_equals_single_tiles_where_they_do_not_overlap(vae):
    z = torch.randn(1, 4, 2, 8, 8)
    vae.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_stride_height=32,
                      tile_sample_stride_width=32)  # fmt: skip
    tiled = vae.decode(z).sample  # latent tiles [0, 6) and [2, 8) per axis: pixels < 16 and >= 48 have one tile
    vae.disable_tiling()
    first_tile, last_tile = vae.decode(z[..., :6, :6]).sample, vae.decode(z[..., 2:, 2:]).sample
    torch.testing.assert_close(tiled[..., :16, :16], first_tile[..., :16, :16], atol=ATOL, rtol=0)
    torch.testing.assert_close(tiled[..., 48:, 48:], last_tile[..., 32:, 32:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_tiled_approximates_untiled(vae):
    x = F.interpolate(video(frames=5, height=8, width=8), size=(5, 64, 64), mode="trilinear")
    untiled_latents, untiled_video = latents_of(vae, x), vae(x).sample
    vae.enable_tiling(tile_sample_min_height=56, tile_sample_min_width=56, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)  # fmt: skip
    tiled_latents, tiled_video = latents_of(vae, x), vae(x).sample
    assert tiled_latents.shape == untiled_latents.shape and tiled_video.shape == untiled_video.shape

    def relative_error(output, reference):
        return ((output - reference).abs().mean() / reference.abs().mean()).item()

    # Tiling is an approximation: each tile has its own per-frame GroupNorm statistics, attends only
    # within itself and sees zero padding at its borders. An untrained network is far less local than
    # a trained VAE, so the error here is large (relative mean error about 0.3-0.5 over seeds); the
    # tolerance 0.75 still catches misassembled tiles (one latent pixel off gives about 1.1-1.3).
    # Exactness of the blending itself is checked by the two tests above.
    assert relative_error(tiled_latents, untiled_latents) < 0.75
    assert relative_error(tiled_video, untiled_video) < 0.75


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile_sample_min_height=60), r"multiple of 8; got 60, nearest valid is 64"),
        (dict(tile_sample_stride_width=13), r"positive multiple of 8; got 13, nearest valid is 16"),
        (dict(tile_sample_min_width=64, tile_sample_stride_width=72), "must not exceed the tile size"),
    ],
)
def test_bad_tiling_settings_raise(vae, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae.enable_tiling(**kwargs)


def test_save_and_load_round_trip(vae, tmp_path):
    vae.register_to_config(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = AutoencoderKLNanoI2V.from_pretrained(tmp_path).eval()
    assert list(loaded.config.latents_std) == [1.0, 2.0, 3.0, 4.0]
    x = video(frames=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, vae(x).sample, atol=0, rtol=0)
    z = torch.randn(1, 4, 2, 2, 2)
    torch.testing.assert_close(loaded.normalize_latents(z), vae.normalize_latents(z), atol=0, rtol=0)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    x = video(2, frames=5)

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        vae = tiny_vae().train()
        if checkpointing:
            vae.enable_gradient_checkpointing()
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.mode()).sample - x).abs().mean() + 1e-3 * posterior.kl().mean()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in vae.named_parameters()}

    loss, grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_gradient_checkpointing_recomputes_blocks(vae, monkeypatch):
    vae.enable_gradient_checkpointing()
    recomputed = []
    original = vae.encoder._gradient_checkpointing_func
    vae.encoder._gradient_checkpointing_func = lambda block, *args: recomputed.append(block) or original(block, *args)
    vae.encode(video(frames=5)).latent_dist.mode().sum().backward()
    assert len(recomputed) == len(vae.encoder.down_blocks) + 1  # down blocks + mid block


def test_normalize_latents(vae):
    z = torch.randn(2, 4, 3, 2, 2)
    torch.testing.assert_close(vae.normalize_latents(z), z)  # identity without statistics
    vae.register_to_config(latents_mean=(1.0, -1.0, 0.5, 0.0), latents_std=(2.0, 0.5, 1.0, 4.0))
    normalized = vae.normalize_latents(z)
    mean = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(normalized, (z - mean) / std)
    torch.testing.assert_close(vae.denormalize_latents(normalized), z, atol=1e-6, rtol=0)


def test_posterior_sampling_follows_the_generator(vae):
    x = video(frames=5)
    with torch.no_grad():
        a = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
        b = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
        c = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
