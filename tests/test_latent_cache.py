"""The `datasets`-backed latent + text-embedding cache (nanoi2v_diffusers/data/latent_cache.py)."""

import json

import datasets
import pytest
import torch
from training_fixtures import single_thread, write_tiny_bert, write_tiny_vae  # noqa: F401 (autouse)
from transformers import AutoModel, AutoTokenizer

from nanoi2v_diffusers.data import ShapesConfig, ShapesDataset
from nanoi2v_diffusers.data.latent_cache import (
    CACHE_INFO_FILE,
    LatentCacheInfo,
    cache_features,
    collate_cache_rows,
    encode_clips,
    load_latent_cache,
    model_fingerprint,
    sample_latents,
    vae_encoder_fingerprint,
    write_latent_cache,
)
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V

LATENT_SHAPE = (4, 2, 4, 4)
TEXT_SHAPE = (8, 32)


def _info(**overrides) -> LatentCacheInfo:
    values = dict(latent_shape=LATENT_SHAPE, text_shape=TEXT_SHAPE, num_clips=0, vae_encoder_fingerprint="vae",
                  text_encoder_fingerprint="text")  # fmt: skip
    return LatentCacheInfo(**{**values, **overrides})


def _random_batches(num_batches: int, batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(num_batches):
        mask = (torch.rand(batch_size, TEXT_SHAPE[0], generator=generator) > 0.3).long()
        batches.append({
            "posterior_mean": torch.randn(batch_size, *LATENT_SHAPE, generator=generator),
            "posterior_std": torch.rand(batch_size, *LATENT_SHAPE, generator=generator),
            "keyframe_mean": torch.randn(batch_size, *LATENT_SHAPE, generator=generator),
            "prompt_embeds": torch.randn(batch_size, *TEXT_SHAPE, generator=generator),
            "prompt_attention_mask": mask,
            "caption": [f"clip {index * batch_size + row}" for row in range(batch_size)],
        })  # fmt: skip
    return batches


def test_cache_round_trips_exactly_in_shards(tmp_path):
    batches = _random_batches(3, 2)
    path = write_latent_cache(iter(batches), tmp_path / "cache", _info(), num_shards=2)

    assert len(list(path.glob("data-*.arrow"))) == 2
    table, info = load_latent_cache(path)
    assert info.num_clips == len(table) == 6
    assert isinstance(table.features["posterior_mean"], datasets.Array4D)
    assert isinstance(table.features["prompt_embeds"], datasets.Array2D)
    loaded = collate_cache_rows([table[index] for index in range(len(table))])
    for name in ("posterior_mean", "posterior_std", "keyframe_mean", "prompt_embeds", "prompt_attention_mask"):
        expected = torch.cat([batch[name] for batch in batches])
        assert loaded[name].dtype == expected.dtype
        assert torch.equal(loaded[name], expected), name
    assert loaded["caption"] == [f"clip {index}" for index in range(6)]


def test_float16_cache_is_read_back_as_float32(tmp_path):
    batches = _random_batches(1, 2)
    write_latent_cache(iter(batches), tmp_path / "cache", _info(dtype="float16"))
    table, _ = load_latent_cache(tmp_path / "cache")
    loaded = collate_cache_rows([table[0], table[1]])
    assert loaded["posterior_mean"].dtype == torch.float32
    torch.testing.assert_close(loaded["posterior_mean"], batches[0]["posterior_mean"].half().float())


@pytest.mark.parametrize("num_clips, world_size", [(6, 2), (7, 3)])
def test_ranks_get_disjoint_parts_that_cover_the_cache(tmp_path, num_clips, world_size):
    batches = _random_batches(num_clips, 1)
    write_latent_cache(iter(batches), tmp_path / "cache", _info())
    parts = [load_latent_cache(tmp_path / "cache", rank, world_size)[0]["caption"] for rank in range(world_size)]
    seen = [caption for part in parts for caption in part]
    assert sorted(seen) == sorted(f"clip {index}" for index in range(num_clips))
    assert len(set(seen)) == len(seen)


def test_interrupted_write_leaves_no_cache(tmp_path):
    def failing_batches():
        yield from _random_batches(1, 2)
        raise RuntimeError("killed while encoding")

    with pytest.raises(RuntimeError, match="killed"):
        write_latent_cache(failing_batches(), tmp_path / "cache", _info())
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="does not exist"):
        load_latent_cache(tmp_path / "cache")


def test_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        write_latent_cache(iter(_random_batches(1, 1)), tmp_path / "cache", _info())


def test_folder_without_info_file_is_not_a_cache(tmp_path):
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=CACHE_INFO_FILE):
        load_latent_cache(tmp_path / "plain")


@pytest.mark.parametrize("key, value", [("vae_encoder_fingerprint", "other"), ("text_encoder_fingerprint", "other"),
                                        ("latent_shape", (4, 3, 4, 4)), ("text_shape", (16, 32)),
                                        ("text_clause_separator", " and ")])  # fmt: skip
def test_mismatched_cache_is_refused_naming_the_setting(key, value):
    expected = dict(latent_shape=LATENT_SHAPE, text_shape=TEXT_SHAPE, vae_encoder_fingerprint="vae",
                    text_encoder_fingerprint="text")  # fmt: skip
    _info().check_matches(**expected)
    with pytest.raises(ValueError, match=key):
        _info().check_matches(**{**expected, key: value})


def test_info_file_round_trips(tmp_path):
    info = _info(num_clips=3, dtype="float16", source="shapes", text_clause_separator=" and ")
    info.save(tmp_path)
    assert LatentCacheInfo.load(tmp_path) == info


def test_info_file_from_before_clause_encoding_reads_as_whole_captions(tmp_path):
    _info().save(tmp_path)
    path = tmp_path / CACHE_INFO_FILE
    values = json.loads(path.read_text())
    del values["text_clause_separator"]
    path.write_text(json.dumps(values))
    assert LatentCacheInfo.load(tmp_path).text_clause_separator is None


def test_cache_of_another_format_version_is_refused(tmp_path):
    _info().save(tmp_path)
    path = tmp_path / CACHE_INFO_FILE
    values = json.loads(path.read_text())
    values["format_version"] = 1
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="format 1.*precompute_latents"):
        LatentCacheInfo.load(tmp_path)


def test_vae_fingerprint_covers_the_encoder_only():
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"])
    before = vae_encoder_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.add_(1.0)
    assert vae_encoder_fingerprint(vae) == before  # a decoder fine-tune keeps the cache valid
    with torch.no_grad():
        vae.encoder.conv_in.conv.weight[0].mul_(1.5)
    assert vae_encoder_fingerprint(vae) != before


def test_unknown_cache_dtype_raises():
    with pytest.raises(ValueError, match="float32"):
        cache_features(LATENT_SHAPE, TEXT_SHAPE, dtype="bfloat16")


def test_model_fingerprint_tracks_weights():
    model = torch.nn.Linear(3, 2)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert model_fingerprint(model) != before


def test_sample_latents_draws_from_the_posterior():
    mean, std = torch.randn(2, 4, 2, 4, 4), torch.rand(2, 4, 2, 4, 4)
    first = sample_latents(mean, std, torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_latents(mean, std, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, sample_latents(mean, std, torch.Generator().manual_seed(4)))
    assert torch.equal(sample_latents(mean, torch.zeros_like(std), torch.Generator().manual_seed(3)), mean)


def test_encode_clips_gives_the_vae_posterior_and_padded_text(tmp_path):
    vae = AutoencoderKLNanoI2V.from_pretrained(write_tiny_vae(tmp_path / "vae")).eval()
    bert_dir = write_tiny_bert(tmp_path / "bert")
    text_encoder, tokenizer = AutoModel.from_pretrained(bert_dir).eval(), AutoTokenizer.from_pretrained(bert_dir)
    clips = ShapesDataset(2, config=ShapesConfig(canvas_size=32, num_frames=5))
    pixels = torch.stack([clips[index]["pixel_values"] for index in range(2)])
    captions = [clips[0]["caption"], ""]

    encoded = encode_clips(vae, text_encoder, tokenizer, pixels, captions, max_sequence_length=12)

    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    torch.testing.assert_close(encoded["posterior_mean"], posterior.mean)
    torch.testing.assert_close(encoded["posterior_std"], posterior.std)
    assert encoded["posterior_mean"].shape == (2, 4, 2, 4, 4)
    assert encoded["prompt_embeds"].shape == (2, 12, 32)
    assert encoded["prompt_attention_mask"][0].sum() > 0
    assert encoded["prompt_attention_mask"][1].sum() == 0  # an empty caption is "no text"
    # Keyframes: latent frame k's last pixel frame (4k) encoded alone, as the pipeline encodes a keyframe;
    # frame 0 is the clip's own first latent frame (the VAE is causal).
    with torch.no_grad():
        last_alone = vae.encode(pixels[:, :, 4:5]).latent_dist.mean  # (B, C, 1, h, w)
    torch.testing.assert_close(encoded["keyframe_mean"][:, :, 1:], last_alone)
    torch.testing.assert_close(encoded["keyframe_mean"][:, :, :1], posterior.mean[:, :, :1])
    assert not torch.allclose(encoded["keyframe_mean"][:, :, 1:], posterior.mean[:, :, 1:])
    assert "keyframe_mean" not in encode_clips(vae, text_encoder, tokenizer, pixels, captions, 12, keyframes=False)
