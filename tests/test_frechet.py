import numpy as np
import pytest
import torch

from nanoi2v_diffusers.evaluation.frechet import (
    ColourMotionFeatures,
    FrechetDistance,
    frechet_distance,
    gaussian_statistics,
)


def random_covariance(rng, dim, rank=None):
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / dim


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), random_covariance(rng, 6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_same_covariance_shifted_means_gives_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_covariance(rng, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    var1, var2 = rng.uniform(0.1, 3.0, size=4), rng.uniform(0.1, 3.0, size=4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_matches_scipy_sqrtm_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    sigma1, sigma2 = random_covariance(rng, 7), random_covariance(rng, 7)
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(linalg.sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(np.zeros(7), sigma1, np.zeros(7), sigma2) == pytest.approx(expected, rel=1e-7)


def test_singular_covariances_stay_finite_and_symmetric():
    rng = np.random.default_rng(4)
    sigma1, sigma2 = random_covariance(rng, 10, rank=3), random_covariance(rng, 10, rank=2)
    mu = rng.normal(size=10)
    forward = frechet_distance(mu, sigma1, mu * 0, sigma2)
    backward = frechet_distance(mu * 0, sigma2, mu, sigma1)
    assert np.isfinite(forward) and forward > 0
    assert forward == pytest.approx(backward, rel=1e-6)


def test_accepts_torch_tensors():
    mu, sigma = torch.tensor([1.0, 2.0]), torch.eye(2)
    assert frechet_distance(mu, sigma, torch.zeros(2), sigma) == pytest.approx(5.0)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_sample_statistics_recover_the_known_distance():
    rng = np.random.default_rng(5)
    shift = np.array([3.0, 0.0, -4.0])
    a = gaussian_statistics(rng.normal(size=(20000, 3)))
    b = gaussian_statistics(rng.normal(size=(20000, 3)) + shift)
    assert frechet_distance(*a, *b) == pytest.approx(25.0, rel=0.02)


def test_accumulator_over_batches_equals_one_shot_statistics():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(23, 4)), rng.normal(size=(17, 4)) * 2 + 1
    metric = FrechetDistance(feature_extractor=lambda x: x)
    for batch in np.array_split(real, 4):
        metric.update(batch, real=True)
    for batch in np.array_split(fake, 3):
        metric.update(batch, real=False)
    assert (metric.num_real, metric.num_fake) == (23, 17)
    expected = frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))
    assert metric.compute() == pytest.approx(expected, rel=1e-10)
    metric.reset()
    with pytest.raises(ValueError, match="at least 2 real"):
        metric.compute()


def test_accumulator_accepts_a_torch_extractor():
    metric = FrechetDistance(feature_extractor=lambda x: torch.as_tensor(x, dtype=torch.float32))
    metric.update(np.array([[0.0], [2.0]]), real=True)
    metric.update(np.array([[1.0], [3.0]]), real=False)
    assert metric.compute() == pytest.approx(1.0)


def moving_square_videos(batch, num_frames=9, size=16, speed=1, seed=0):
    """(B, T, H, W, 3) uint8: a red 4x4 square starting at a random place, moving right."""
    rng = np.random.default_rng(seed)
    videos = np.zeros((batch, num_frames, size, size, 3), dtype=np.uint8)
    for video, (x, y) in zip(videos, rng.integers(0, size // 2, size=(batch, 2))):
        for t, frame in enumerate(video):
            left = min(x + speed * t, size - 4)
            frame[y : y + 4, left : left + 4, 0] = 255
    return videos


def test_default_features_shape_dtype_and_uint8_float_agreement():
    extractor = ColourMotionFeatures()
    videos = moving_square_videos(3)
    features = extractor(videos)
    assert features.shape == (3, extractor.dim)
    np.testing.assert_allclose(features, extractor(videos / 255.0), atol=1e-6)


def test_default_features_see_motion():
    extractor = ColourMotionFeatures()
    moving = extractor(moving_square_videos(1))
    frozen = extractor(np.repeat(moving_square_videos(1)[:, :1], 9, axis=1))
    motion_slice = slice(3 * extractor.colour_bins + 3 * extractor.grid**2, None)
    assert moving[0, motion_slice].sum() > 0
    assert frozen[0, motion_slice].sum() == 0


def test_default_metric_ranks_frozen_videos_further_than_fresh_moving_ones():
    real = moving_square_videos(16, seed=0)
    metric_same = FrechetDistance()
    metric_same.update(real, real=True)
    metric_same.update(moving_square_videos(16, seed=1), real=False)
    metric_frozen = FrechetDistance()
    metric_frozen.update(real, real=True)
    metric_frozen.update(np.repeat(moving_square_videos(16, seed=1)[:, :1], 9, axis=1), real=False)
    assert metric_frozen.compute() > metric_same.compute()


def test_default_features_reject_wrong_layout():
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        ColourMotionFeatures()(np.zeros((2, 3, 9, 16, 16)))
