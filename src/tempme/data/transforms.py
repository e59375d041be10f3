"""CLIP's test-time image transform, written with PIL instead of torchvision.

Resize the short side (bicubic) -> centre crop -> RGB -> [0, 1] -> normalise with
CLIP's mean and std; numerically the same as torchvision's ``Resize``/``CenterCrop``/
``ToTensor``/``Normalize`` pipeline used by TempMe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic) so the shorter side is ``size``; the long side is truncated like torchvision."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square, offsets rounded like torchvision."""
    width, height = image.size
    top = round((height - size) / 2)
    left = round((width - size) / 2)
    return image.crop((left, top, left + size, top + size))


def clip_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """CLIP test transform of one image.

    Returns:
        FloatTensor[3, size, size], normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`.
    """
    # Same order as the reference Compose: RGB conversion comes after resize and crop,
    # which matters for palette images (PIL resizes those with nearest neighbour).
    image = center_crop(resize_short_side(image, size), size).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    tensor = pixels.permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return tensor.sub(mean).div(std)


def frames_to_tensor(frames: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """Apply :func:`clip_preprocess` to every frame.

    Returns:
        FloatTensor[F, 3, size, size].
    """
    if not frames:
        raise ValueError("frames_to_tensor needs at least one frame")
    return torch.stack([clip_preprocess(frame, size) for frame in frames])
