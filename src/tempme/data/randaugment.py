"""Video RandAugment as TempMe trains with it: ``rand-m7-n4-mstd0.5-inc1``.

Per video: draw ``num_ops`` ops with replacement from the 15 "increasing" ops (timm's
``_RAND_INCREASING_TRANSFORMS``, where a larger magnitude always means a stronger
change); each op is applied with probability ``prob`` at a magnitude drawn from
N(magnitude, magnitude_std) and clipped to [0, 10]. The op choice and every parameter
(including the random sign of rotations, shears, translations and enhancements) are
drawn once and applied identically to all frames, so the clip stays temporally coherent.
Geometric ops resample bicubically and fill with grey (128, 128, 128).

Translations are relative (``TranslateXRel``/``TranslateYRel``: up to 45% of the frame
side at magnitude 10). The reference also sets ``translate_const=100`` (0.45 x 224), but
only the absolute ``TranslateX``/``TranslateY`` ops read it and they are not in this set.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_FRACTION = 0.45

INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


class RandomSource(Protocol):
    """The part of :class:`random.Random` used here (the ``random`` module fits too)."""

    def random(self) -> float: ...

    def gauss(self, mu: float, sigma: float) -> float: ...

    def choice(self, seq: Sequence[str]) -> str: ...


@dataclass(frozen=True)
class AugmentStep:
    """One op with its drawn parameters, applied the same way to every frame of a video."""

    name: str
    args: tuple[float, ...] = ()


# --- magnitude (0..10) -> op parameters -------------------------------------------------


def _signed(value: float, rng: RandomSource) -> float:
    return -value if rng.random() > 0.5 else value


def _no_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return ()


def _rotate_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (_signed(level / MAX_LEVEL * 30.0, rng),)


def _posterize_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (4 - int(level / MAX_LEVEL * 4),)


def _solarize_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (256 - int(level / MAX_LEVEL * 256),)


def _solarize_add_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (int(level / MAX_LEVEL * 110),)


def _enhance_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    # 1.0 leaves the image unchanged; the magnitude moves the factor towards 0.1 or 1.9.
    return (1.0 + _signed(level / MAX_LEVEL * 0.9, rng),)


def _shear_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (_signed(level / MAX_LEVEL * 0.3, rng),)


def _translate_args(level: float, rng: RandomSource) -> tuple[float, ...]:
    return (_signed(level / MAX_LEVEL * TRANSLATE_FRACTION, rng),)


# --- ops on one RGB image ------------------------------------------------------------------


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BICUBIC, fillcolor=FILL
    )


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=FILL)


def _shear_x(image: Image.Image, factor: float) -> Image.Image:
    return _affine(image, (1, factor, 0, 0, 1, 0))


def _shear_y(image: Image.Image, factor: float) -> Image.Image:
    return _affine(image, (1, 0, 0, factor, 1, 0))


def _translate_x(image: Image.Image, fraction: float) -> Image.Image:
    return _affine(image, (1, 0, fraction * image.size[0], 0, 1, 0))


def _translate_y(image: Image.Image, fraction: float) -> Image.Image:
    return _affine(image, (1, 0, 0, 0, 1, fraction * image.size[1]))


def _posterize(image: Image.Image, bits: float) -> Image.Image:
    return image if bits >= 8 else ImageOps.posterize(image, int(bits))


def _solarize(image: Image.Image, threshold: float) -> Image.Image:
    return ImageOps.solarize(image, threshold)


def _solarize_add(image: Image.Image, add: float, threshold: int = 128) -> Image.Image:
    """Brighten the pixels below ``threshold`` by ``add`` (saturating at 255)."""
    lut = [min(255, value + int(add)) if value < threshold else value for value in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhancer(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, factor: kind(image).enhance(factor)


_OPS: dict[str, tuple[Callable[..., tuple[float, ...]], Callable[..., Image.Image]]] = {
    "AutoContrast": (_no_args, ImageOps.autocontrast),
    "Equalize": (_no_args, ImageOps.equalize),
    "Invert": (_no_args, ImageOps.invert),
    "Rotate": (_rotate_args, _rotate),
    "PosterizeIncreasing": (_posterize_args, _posterize),
    "SolarizeIncreasing": (_solarize_args, _solarize),
    "SolarizeAdd": (_solarize_add_args, _solarize_add),
    "ColorIncreasing": (_enhance_args, _enhancer(ImageEnhance.Color)),
    "ContrastIncreasing": (_enhance_args, _enhancer(ImageEnhance.Contrast)),
    "BrightnessIncreasing": (_enhance_args, _enhancer(ImageEnhance.Brightness)),
    "SharpnessIncreasing": (_enhance_args, _enhancer(ImageEnhance.Sharpness)),
    "ShearX": (_shear_args, _shear_x),
    "ShearY": (_shear_args, _shear_y),
    "TranslateXRel": (_translate_args, _translate_x),
    "TranslateYRel": (_translate_args, _translate_y),
}


def apply_steps(frames: Sequence[Image.Image], steps: Sequence[AugmentStep]) -> list[Image.Image]:
    """Apply the same ops, in order, to every frame; frames are converted to RGB first."""
    frames = [frame.convert("RGB") for frame in frames]
    for step in steps:
        op = _OPS[step.name][1]
        frames = [op(frame, *step.args) for frame in frames]
    return frames


class VideoRandAugment:
    """RandAugment for a list of frames, with one draw of ops and parameters per video.

    Args:
        num_ops: ops drawn (with replacement) per video.
        magnitude: mean magnitude on the 0..10 scale.
        magnitude_std: std of the per-op magnitude noise (0 = fixed magnitude).
        prob: probability that each drawn op is applied.
        rng: a :class:`random.Random`, a seed, or ``None`` for the global ``random`` module.
            With DataLoader workers keep ``None``: PyTorch reseeds ``random`` per worker,
            whereas a seeded generator is copied into every worker and repeats its draws.
    """

    def __init__(
        self,
        num_ops: int = 4,
        magnitude: float = 7.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        rng: random.Random | int | None = None,
    ):
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.prob = prob
        # The global ``random`` module is looked up at call time rather than stored, so that
        # instances stay picklable for DataLoader workers started with 'spawn'.
        self._rng = random.Random(rng) if isinstance(rng, int) else rng

    @property
    def _source(self) -> RandomSource:
        return random if self._rng is None else self._rng

    def sample_steps(self) -> list[AugmentStep]:
        """Draw the ops for one video; ops that lose their ``prob`` coin flip are left out."""
        rng = self._source
        names = [rng.choice(INCREASING_OPS) for _ in range(self.num_ops)]
        steps = []
        for name in names:
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.gauss(level, self.magnitude_std)
            level = min(MAX_LEVEL, max(0.0, level))
            steps.append(AugmentStep(name, _OPS[name][0](level, rng)))
        return steps

    def __call__(self, frames: Sequence[Image.Image]) -> list[Image.Image]:
        """Augment the frames of one video.

        Args:
            frames: F images of one video (same size).

        Returns:
            F RGB images of the same sizes, all transformed with the same ops and parameters.
        """
        return apply_steps(frames, self.sample_steps())
