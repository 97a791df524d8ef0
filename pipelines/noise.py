"""Initial noise the A1111 way: one CPU generator per image, variation seeds by slerp.

A1111 draws each image's starting noise from its own seed (``seed + i``) with a
CPU ``torch.Generator`` when its RNG source is "CPU", so the image for a seed
does not depend on its position in a batch or on the device. Variation seeds
(``subseed`` / ``subseed_strength``) blend a second noise by spherical
interpolation.
"""

from __future__ import annotations

import torch


def image_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise for one image, reproducible on any device."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def slerp(weight: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of shape (C, H, W), per channel row."""
    low_flat = low.reshape(low.shape[0], -1)
    high_flat = high.reshape(high.shape[0], -1)
    low_dir = low_flat / low_flat.norm(dim=1, keepdim=True)
    high_dir = high_flat / high_flat.norm(dim=1, keepdim=True)
    dot = (low_dir * high_dir).sum(1)
    if dot.mean() > 0.9995:
        # nearly parallel: linear interpolation is exact enough and avoids 0/0
        return low * (1.0 - weight) + high * weight
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    a = (torch.sin((1.0 - weight) * omega) / sin_omega).unsqueeze(1)
    b = (torch.sin(weight * omega) / sin_omega).unsqueeze(1)
    return (a * low_flat + b * high_flat).reshape(low.shape)


def batch_latents(
    seeds: list[int],
    subseeds: list[int],
    subseed_strength: float,
    shape: tuple[int, int, int],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Stack the starting latents of a batch: image ``i`` from ``seeds[i]`` (blended with ``subseeds[i]``)."""
    rows = []
    for seed, subseed in zip(seeds, subseeds, strict=True):
        noise = image_noise(seed, shape)
        if subseed_strength > 0:
            noise = slerp(subseed_strength, noise, image_noise(subseed, shape))
        rows.append(noise)
    return torch.stack(rows).to(device=device, dtype=dtype)
