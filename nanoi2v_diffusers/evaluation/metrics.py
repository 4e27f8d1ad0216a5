"""Reconstruction metrics for videos: PSNR and SSIM, one number per video.

Inputs are float tensors with values in [0, data_range] (pass `data_range=2.0` for [-1, 1]),
shaped `(B, C, T, H, W)` (videos) or `(B, C, H, W)` (images).
"""

import torch
import torch.nn.functional as F

# Wang et al. 2004: 11 x 11 Gaussian window with sigma 1.5, and the stabilising constants
# C1 = (K1 * L)^2, C2 = (K2 * L)^2 for a data range L.
SSIM_WINDOW_SIZE = 11
SSIM_WINDOW_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"Both inputs must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.ndim not in (4, 5):
        raise ValueError(f"Expected (B, C, T, H, W) videos or (B, C, H, W) images; got shape {tuple(x.shape)}.")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, `10 log10(data_range^2 / MSE)`, with the MSE over each whole video.

    Returns a `(B,)` float64 tensor; identical inputs give `inf`.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """(1, 1, K, K) normalised Gaussian window."""
    coords = torch.arange(SSIM_WINDOW_SIZE, dtype=torch.float64, device=device) - (SSIM_WINDOW_SIZE - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * SSIM_WINDOW_SIGMA**2))
    weights = weights / weights.sum()
    return torch.outer(weights, weights)[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), averaged over every frame, channel and valid window position.

    Each frame is compared as an image, channel by channel, with an 11 x 11 Gaussian window (sigma 1.5)
    applied without padding; frames must be at least 11 x 11. Returns a `(B,)` float64 tensor;
    identical inputs give 1.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW_SIZE} x {SSIM_WINDOW_SIZE} pixels; got {tuple(x.shape[-2:])}."
        )
    batch = x.shape[0]
    # Every (sample, channel, frame) becomes one single-channel image: (N, 1, H, W).
    x = x.double().reshape(-1, 1, *x.shape[-2:])
    y = y.double().reshape(-1, 1, *y.shape[-2:])
    window = _gaussian_window(x.device)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * structure).reshape(batch, -1).mean(dim=1)

