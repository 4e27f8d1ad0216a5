"""Image conditioning shared by the pipeline and the training scripts (docs/design.md, "Conditioning").

The transformer sees, concatenated on channels, the noisy latents, a conditioning video that holds
the image latent at latent frame 0 and zeros elsewhere, and a one-channel mask marking that frame.
Keeping the layout in one place means training and sampling can never disagree about it.
"""

from typing import Optional

import torch

# One mask channel: with temporal compression the image is exactly latent frame 0 (the VAE is
# causal and encodes the first frame on its own), so a per-latent-frame flag is enough.
NUM_MASK_CHANNELS = 1


def num_condition_channels(latent_channels: int) -> int:
    """Channels of the `condition` tensor the transformer takes beside the noisy latents."""
    return latent_channels + NUM_MASK_CHANNELS


def build_image_condition(
    image_latents: Optional[torch.Tensor],
    num_latent_frames: int,
    *,
    batch_size: Optional[int] = None,
    latent_channels: Optional[int] = None,
    spatial_shape: Optional[tuple] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Build the `(B, C + 1, T, h, w)` conditioning video from image latents `(B, C, 1, h, w)`.

    With `image_latents=None` (text-to-video / unconditional) the condition is all zeros with mask
    0; then `batch_size`, `latent_channels` and `spatial_shape` say its size.
    """
    if image_latents is None:
        if batch_size is None or latent_channels is None or spatial_shape is None:
            raise ValueError("Without image_latents, pass batch_size, latent_channels and spatial_shape.")
        shape = (batch_size, latent_channels + NUM_MASK_CHANNELS, num_latent_frames, *spatial_shape)
        return torch.zeros(shape, dtype=dtype, device=device)
    if image_latents.ndim != 5 or image_latents.shape[2] != 1:
        raise ValueError(
            f"image_latents must be (B, C, 1, h, w), the VAE latent of a one-frame video; got {tuple(image_latents.shape)}."
        )
    b, c, _, h, w = image_latents.shape  # (B, C, 1, h, w)
    condition = image_latents.new_zeros((b, c + NUM_MASK_CHANNELS, num_latent_frames, h, w))
    condition[:, :c, :1] = image_latents
    condition[:, c:, :1] = 1.0
    if dtype is not None:
        condition = condition.to(dtype)
    return condition


def drop_image_condition(condition: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the condition (latents and mask) of the batch rows where `keep` (B,) is False."""
    return condition * keep.to(condition.dtype).view(-1, 1, 1, 1, 1)
