import math

import numpy as np
import pytest
import torch

from nanoi2v_diffusers.evaluation import psnr, ssim
from nanoi2v_diffusers.evaluation.metrics import SSIM_K1, SSIM_K2, SSIM_WINDOW_SIGMA, SSIM_WINDOW_SIZE


def test_psnr_identical_is_inf():
    video = torch.rand(2, 3, 5, 16, 16)
    assert torch.isinf(psnr(video, video.clone())).all()


def test_psnr_of_known_mse():
    a = torch.zeros(2, 3, 5, 8, 8)
    b = torch.full_like(a, 0.1)  # MSE 0.01 -> 20 dB at data range 1
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    # Same error on a [-1, 1] scale (data range 2) is 6.02 dB better.
    assert psnr(a, b, data_range=2.0)[0].item() == pytest.approx(20.0 + 20 * math.log10(2.0))


def test_psnr_is_per_video():
    a = torch.zeros(2, 3, 1, 8, 8)
    b = a.clone()
    b[1] = 0.01  # only the second video differs: MSE 1e-4 -> 40 dB
    scores = psnr(a, b)
    assert torch.isinf(scores[0]) and scores[1].item() == pytest.approx(40.0)


def test_ssim_identical_is_one():
    video = torch.rand(2, 3, 3, 24, 24)
    assert torch.allclose(ssim(video, video.clone()), torch.ones(2, dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term():
    # No variance anywhere: SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    c1 = SSIM_K1**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook SSIM of two grey images with explicit loops over every valid window."""
    half = SSIM_WINDOW_SIZE // 2
    coords = np.arange(SSIM_WINDOW_SIZE) - half
    g = np.exp(-(coords**2) / (2 * SSIM_WINDOW_SIGMA**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    scores = []
    for i in range(x.shape[0] - SSIM_WINDOW_SIZE + 1):
        for j in range(x.shape[1] - SSIM_WINDOW_SIZE + 1):
            px, py = x[i : i + SSIM_WINDOW_SIZE, j : j + SSIM_WINDOW_SIZE], y[i : i + SSIM_WINDOW_SIZE, j : j + SSIM_WINDOW_SIZE]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            scores.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(scores))


def test_ssim_matches_a_loop_reference_on_noisy_images():
    x = torch.rand(1, 1, 14, 15, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    expected = _reference_ssim(x[0, 0].numpy(), y[0, 0].numpy())
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)
    assert ssim(x, y).item() < 0.95  # the noise is visible to SSIM


def test_ssim_averages_frames_and_channels():
    x = torch.rand(1, 2, 2, 12, 12, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    per_image = [_reference_ssim(x[0, c, t].numpy(), y[0, c, t].numpy()) for c in range(2) for t in range(2)]
    assert ssim(x, y).item() == pytest.approx(np.mean(per_image), rel=1e-9)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), "same shape"),
        (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), "Expected"),
    ],
)
def test_bad_inputs_raise(x, y, message):
    with pytest.raises(ValueError, match=message):
        psnr(x, y)


def test_ssim_rejects_frames_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))
