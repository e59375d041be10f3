"""Typed configuration: model architecture, merge schedule, and the preset registry.

Architecture presets follow OpenAI CLIP. Merge defaults follow the TempMe paper (SPEC section 2):
the schedule depends on the backbone's patch size and on the number of frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Literal, get_args

MergeMethod = Literal["none", "tome", "tempme"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)


@dataclass(frozen=True)
class VisionConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 32
    image_size: int = 224

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """Patch tokens plus the CLS token."""
        return self.grid_size**2 + 1


@dataclass(frozen=True)
class TextConfig:
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass(frozen=True)
class MergeConfig:
    """How the video encoder merges tokens.

    ``cross_merge_ratio`` and ``intra_merge_ratio`` are the fractions of tokens *merged* (the authors'
    ``merge_token_proportion`` divided by 100); the paper's retained ratios are R_C = 1 - cross and
    R_I = 1 - intra.
    """

    method: MergeMethod = "tempme"
    tome_r: int = 2
    merge_layers: tuple[int, ...] = (8, 9, 10)
    clips_joined: tuple[int, ...] = (2, 2, 3)
    cross_merge_ratio: float = 0.3
    intra_merge_ratio: float = 0.1
    clip_pos_embed: bool = True
    prop_attn: bool = True

    def replace(self, **changes) -> "MergeConfig":
        return dataclasses.replace(self, **changes)


def settings_ignored_by(method: str, names: Iterable[str]) -> list[str]:
    """Those of the schedule settings ``names`` that ``method`` never reads (``none`` merges nothing;
    ``tome`` has ImgMe's ``tome_r`` in every layer and proportional attention, no ClipMe)."""
    read = {"none": set(), "tome": {"tome_r", "prop_attn"}}.get(method)
    return [] if read is None else sorted(set(names) - read)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model: architecture, frame count, schedule, LoRA, text length."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    frames: int = 12
    max_words: int = 32


# The fewest caption tokens the text encoder can read: its start and end tokens and one word between
# them (with two, every caption would encode alike). Models, the tokenizer and training configs check it.
MIN_WORDS = 3


_PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": CLIPConfig(),
    "ViT-B/16": CLIPConfig(vision=VisionConfig(patch_size=16)),
    "ViT-L/14": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(width=1024, layers=24, heads=16, patch_size=14),
        text=TextConfig(width=768, heads=12),
    ),
    # Tiny models with the token layout of B/32 and B/16 (same grid, 12 layers), for tests and demos.
    "tiny-B/32": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(width=64, layers=12, heads=4, patch_size=32),
        text=TextConfig(width=64, layers=2, heads=4),
    ),
    "tiny-B/16": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(width=64, layers=12, heads=4, patch_size=16),
        text=TextConfig(width=64, layers=2, heads=4),
    ),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> CLIPConfig:
    """Architecture of a named preset. Raises a ``ValueError`` that lists the known names."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}") from None


def register_preset(name: str, config: CLIPConfig) -> None:
    """Add a preset (for example a small architecture of your own)."""
    _PRESETS[name] = config


def balanced_factors(frames: int, steps: int = 3) -> tuple[int, ...]:
    """Split ``frames`` into ``steps`` ascending factors whose product is ``frames``, as even as possible.

    12 -> (2, 2, 3) and 64 -> (4, 4, 4), the paper's schedules.
    """
    best: tuple[int, ...] | None = None

    def search(remaining: int, smallest: int, chosen: tuple[int, ...]) -> None:
        nonlocal best
        if len(chosen) == steps - 1:
            if remaining >= smallest:
                candidate = chosen + (remaining,)
                if best is None or max(candidate) - min(candidate) < max(best) - min(best):
                    best = candidate
            return
        for factor in range(smallest, remaining + 1):
            if remaining % factor == 0:
                search(remaining // factor, factor, chosen + (factor,))

    search(frames, 1, ())
    assert best is not None
    return best


def default_merge_config(clip: CLIPConfig, frames: int, method: MergeMethod = "tempme") -> MergeConfig:
    """The paper's schedule for this backbone and frame count (SPEC section 2).

    B/32: ImgMe r=2, 30%/10% merged; B/16 (and finer patches): r=10, 40%/20%. 12 frames join 2-2-3,
    64 frames 4-4-4, other counts the most even three-step factorisation.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    fine_patches = clip.vision.patch_size <= 16
    layers = clip.vision.layers
    return MergeConfig(
        method=method,
        tome_r=10 if fine_patches else 2,
        merge_layers=(layers - 4, layers - 3, layers - 2),
        clips_joined=balanced_factors(frames),
        cross_merge_ratio=0.4 if fine_patches else 0.3,
        intra_merge_ratio=0.2 if fine_patches else 0.1,
    )
