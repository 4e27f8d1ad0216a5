"""Frechet distance between two sets of features, with a pluggable video feature extractor.

The Frechet (2-Wasserstein) distance between Gaussians N(mu1, S1) and N(mu2, S2) is

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

FID and FVD are this number computed on Inception / I3D features. Here the extractor is a
callable `videos -> (N, D) features`; the default, `ColourMotionFeatures`, is a cheap hand-made
descriptor (colour histograms, coarse layout and motion energy) so the metric runs offline on a
CPU. It is NOT I3D: numbers from it are only comparable with each other, never with published FVD.
"""

from typing import Callable, Optional, Tuple

import numpy as np

# Features for one video per row.
FeatureExtractor = Callable[[np.ndarray], np.ndarray]


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    # Round-off makes tiny eigenvalues of a PSD matrix slightly negative; they are zero.
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * roots) @ eigenvectors.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) without a general (non-symmetric) matrix square root.

    S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so both have the same
    eigenvalues and the trace of the root is the sum of their square roots. This stays real
    and stable for singular covariances (fewer samples than feature dimensions), where
    `scipy.linalg.sqrtm(S1 @ S2)` returns complex values and needs an epsilon offset.
    """
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def _as_statistics(mu, sigma, name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"`mu{name}` must be a vector (D,); got shape {mu.shape}.")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"`sigma{name}` must be a (D, D) matrix with D = len(mu{name}) = {mu.shape[0]}; got shape {sigma.shape}."
        )
    return mu, (sigma + sigma.T) / 2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape `(D,)` (numpy arrays, torch CPU tensors or lists).
        sigma1, sigma2: covariances, shape `(D, D)`, symmetric positive semi-definite.

    Returns:
        `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`, computed in
        float64, never negative.
    """
    mu1, sigma1 = _as_statistics(mu1, sigma1, "1")
    mu2, sigma2 = _as_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"Both Gaussians need the same dimension; got {mu1.shape[0]} and {mu2.shape[0]}.")
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    covariance_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    # The true value is >= 0; only round-off (identical inputs) can take it below.
    return max(mean_term + covariance_term, 0.0)


def gaussian_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean `(D,)` and unbiased covariance `(D, D)` of features `(N, D)`, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be (N, D) with N >= 2 samples; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _videos_as_float(videos) -> np.ndarray:
    """(B, T, H, W, 3) uint8 or floats in [0, 1] -> float32 in [0, 1]."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(
            f"`videos` must be (B, T, H, W, 3) (the pipeline's output_type='np'); got shape {videos.shape}."
        )
    if videos.dtype == np.uint8:
        return videos.astype(np.float32) / 255.0
    return videos.astype(np.float32)


def _pool_axis(x: np.ndarray, axis: int, bins: int) -> np.ndarray:
    """Average `x` over `bins` near-equal segments of `axis` (sizes need not divide)."""
    segments = np.array_split(x, bins, axis=axis)
    return np.stack([segment.mean(axis=axis) for segment in segments], axis=axis)


class ColourMotionFeatures:
    """A cheap, deterministic video descriptor for `FrechetDistance` (not I3D).

    Per video, concatenated:
      - colour histogram: per RGB channel, the fraction of pixels in each of `colour_bins`
        intensity bins, averaged over frames (`3 * colour_bins` values): are the colours right;
      - layout: mean colour on a `grid x grid` grid, averaged over frames (`3 * grid**2`): where
        things are;
      - motion map: mean absolute frame-to-frame difference on the same grid (`grid**2`): where
        things move;
      - motion profile: the mean absolute frame difference in `time_bins` segments of the clip
        (`time_bins`): when things move, so frozen or flickering videos stand out.

    Videos are `(B, T, H, W, 3)`, uint8 or floats in [0, 1], with T >= 2 and H, W >= `grid`.
    """

    def __init__(self, colour_bins: int = 8, grid: int = 4, time_bins: int = 4):
        self.colour_bins = colour_bins
        self.grid = grid
        self.time_bins = time_bins

    @property
    def dim(self) -> int:
        return 3 * self.colour_bins + 4 * self.grid**2 + self.time_bins

    def _colour_histogram(self, videos: np.ndarray) -> np.ndarray:
        bin_index = np.minimum((videos * self.colour_bins).astype(np.int64), self.colour_bins - 1)  # (B, T, H, W, 3)
        one_hot = bin_index[..., None] == np.arange(self.colour_bins)  # (B, T, H, W, 3, bins)
        return one_hot.mean(axis=(1, 2, 3)).reshape(len(videos), -1)

    def _on_grid(self, maps: np.ndarray) -> np.ndarray:
        """(B, T, H, W, C) -> (B, grid * grid * C), averaged over time."""
        pooled = _pool_axis(_pool_axis(maps.mean(axis=1), 1, self.grid), 2, self.grid)
        return pooled.reshape(len(maps), -1)

    def __call__(self, videos) -> np.ndarray:
        videos = _videos_as_float(videos)
        _, num_frames, height, width, _ = videos.shape
        if num_frames < 2 or min(height, width) < self.grid:
            raise ValueError(f"`videos` need T >= 2 frames and H, W >= grid={self.grid}; got shape {videos.shape}.")
        motion = np.abs(np.diff(videos, axis=1)).mean(axis=-1, keepdims=True)  # (B, T-1, H, W, 1)
        time_bins = min(self.time_bins, num_frames - 1)
        profile = _pool_axis(motion.mean(axis=(2, 3, 4)), 1, time_bins)  # (B, time_bins)
        profile = np.pad(profile, ((0, 0), (0, self.time_bins - time_bins)))
        features = [self._colour_histogram(videos), self._on_grid(videos), self._on_grid(motion), profile]
        return np.concatenate(features, axis=1).astype(np.float64)


class _RunningGaussian:
    """Mean and covariance of a stream of feature batches (Chan et al.'s pairwise merge, float64)."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.scatter = None  # sum of outer products of deviations from the mean

    def update(self, features: np.ndarray) -> None:
        batch_count = features.shape[0]
        batch_mean = features.mean(axis=0)
        deviations = features - batch_mean
        batch_scatter = deviations.T @ deviations
        if self.count == 0:
            self.count, self.mean, self.scatter = batch_count, batch_mean, batch_scatter
            return
        if batch_mean.shape != self.mean.shape:
            raise ValueError(
                f"Feature dimension changed between updates: {self.mean.shape[0]} then {batch_mean.shape[0]}."
            )
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.scatter = self.scatter + batch_scatter + np.outer(delta, delta) * (self.count * batch_count / total)
        self.mean = self.mean + delta * (batch_count / total)
        self.count = total

    def statistics(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"Need at least 2 {name} samples for a covariance; got {self.count}.")
        return self.mean, self.scatter / (self.count - 1)


class FrechetDistance:
    """Accumulates features of real and generated videos, then gives their Frechet distance.

    Example:
        >>> fd = FrechetDistance()  # default extractor: ColourMotionFeatures (not I3D)
        >>> fd.update(real_videos, real=True)  # (B, T, H, W, 3), any number of batches
        >>> fd.update(generated_videos, real=False)
        >>> fd.compute()

    Args:
        feature_extractor: callable `videos -> (N, D)` features (numpy or CPU torch). Plug in a
            real video network (e.g. I3D) for FVD-comparable numbers.
    """

    def __init__(self, feature_extractor: Optional[FeatureExtractor] = None):
        self.feature_extractor = feature_extractor if feature_extractor is not None else ColourMotionFeatures()
        self.reset()

    def reset(self) -> None:
        self._real = _RunningGaussian()
        self._fake = _RunningGaussian()

    @property
    def num_real(self) -> int:
        return self._real.count

    @property
    def num_fake(self) -> int:
        return self._fake.count

    def update(self, videos, real: bool) -> None:
        features = self.feature_extractor(videos)
        if hasattr(features, "detach"):  # a torch extractor
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"The feature extractor must return (N, D) features; got shape {features.shape}.")
        (self._real if real else self._fake).update(features)

    def compute(self) -> float:
        mu_real, sigma_real = self._real.statistics("real")
        mu_fake, sigma_fake = self._fake.statistics("generated")
        return frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
