"""One factory: build a TempMe model from a preset or from weights, with schedule overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import CLIPConfig, LoRAConfig, MergeConfig, ModelConfig, default_merge_config, get_preset
from .model import TempMe

MERGE_FIELDS = {f.name for f in dataclasses.fields(MergeConfig)}


def build_config(
    clip: CLIPConfig | str,
    method: str = "tempme",
    frames: int = 12,
    lora_rank: int = 8,
    max_words: int = 32,
    **merge_overrides,
) -> ModelConfig:
    """The paper's defaults for this backbone and frame count, with any schedule field overridden.

    Overrides are ``MergeConfig`` fields: ``tome_r``, ``merge_layers``, ``clips_joined``,
    ``cross_merge_ratio``, ``intra_merge_ratio``, ``clip_pos_embed``, ``prop_attn``.
    """
    if isinstance(clip, str):
        clip = get_preset(clip)
    unknown = set(merge_overrides) - MERGE_FIELDS
    if unknown:
        raise TypeError(f"unknown schedule setting(s) {sorted(unknown)}; valid: {sorted(MERGE_FIELDS - {'method'})}")
    for name in ("merge_layers", "clips_joined"):
        if name in merge_overrides:
            merge_overrides[name] = tuple(merge_overrides[name])
    merge = default_merge_config(clip, frames, method).replace(**merge_overrides)
    return ModelConfig(clip=clip, merge=merge, lora=LoRAConfig(rank=lora_rank), frames=frames, max_words=max_words)


def create_model(
    config: ModelConfig | CLIPConfig | str = "ViT-B/32",
    method: str = "tempme",
    frames: int = 12,
    device: str | torch.device = "cpu",
    **kwargs,
) -> TempMe:
    """A randomly initialised model. ``config`` is a full ``ModelConfig``, an architecture, or a preset name;
    other keyword arguments go to ``build_config``."""
    if not isinstance(config, ModelConfig):
        config = build_config(config, method=method, frames=frames, **kwargs)
    return TempMe(config).to(device)


def load_model(
    weights: str | Path,
    method: str = "tempme",
    frames: int | None = None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> TempMe:
    """Load CLIP weights (OpenAI, open_clip, Hugging Face, the authors' or tempme checkpoints) or a preset name.

    The architecture is read from the weights. A tempme checkpoint brings its own schedule and frame
    count unless overridden here. LoRA and clip positional embeddings found in the weights are loaded;
    otherwise they keep their initial values (LoRA B = 0, CPE = 0), which leaves CLIP's outputs unchanged.
    """
    from .weights import load_state_dict_into, load_weights

    loaded = load_weights(weights)
    saved = loaded.model_config
    if saved is not None and frames in (None, saved.frames) and method == saved.merge.method and not kwargs:
        config = saved
    else:
        frames = frames or (saved.frames if saved else None) or loaded.frames or 12
        kwargs.setdefault("lora_rank", loaded.lora_rank or 8)
        if saved is not None:
            kwargs.setdefault("max_words", saved.max_words)
        config = build_config(loaded.clip_config, method=method, frames=frames, **kwargs)
    model = TempMe(config)
    load_state_dict_into(model, loaded.state_dict)
    return model.to(device).eval()
