"""One factory: build a TempMe model from a preset or from weights, with schedule overrides."""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import torch

from .config import (
    CLIPConfig,
    LoRAConfig,
    MergeConfig,
    ModelConfig,
    default_merge_config,
    get_preset,
    settings_ignored_by,
)
from .devices import checked_device
from .model import TempMe, is_adapter_parameter
from .schedule import ScheduleError, check_frames
from .userwarnings import VideoEncoderWarning, warn

MERGE_FIELDS = {f.name for f in dataclasses.fields(MergeConfig)}


def _as_int(value):
    """An integer of any kind (numpy's, torch's) as a Python int; anything else (a bool too) as it is,
    for the checks that follow to name."""
    return operator.index(value) if hasattr(value, "__index__") and not isinstance(value, bool) else value


def build_config(
    clip: CLIPConfig | str,
    method: str | None = None,
    frames: int = 12,
    lora_rank: int = 8,
    max_words: int = 32,
    schedule: MergeConfig | None = None,
    **merge_overrides,
) -> ModelConfig:
    """``schedule`` (by default the paper's for this backbone, frame count and method), with any of
    its fields overridden. ``method`` defaults to the schedule's, else ``"tempme"``.

    Overrides are ``MergeConfig`` fields: ``tome_r``, ``merge_layers``, ``clips_joined``,
    ``cross_merge_ratio``, ``intra_merge_ratio``, ``clip_pos_embed``, ``prop_attn``.
    """
    if isinstance(clip, str):
        clip = get_preset(clip)
    if schedule is not None and method is not None and method != schedule.method:
        raise ValueError(f"method {method!r} and the schedule's method {schedule.method!r} differ: give one")
    if method is None:
        method = schedule.method if schedule is not None else "tempme"
    unknown = set(merge_overrides) - MERGE_FIELDS
    if unknown:
        raise TypeError(f"unknown schedule setting(s) {sorted(unknown)}; valid: {sorted(MERGE_FIELDS - {'method'})}")
    frames, lora_rank, max_words = _as_int(frames), _as_int(lora_rank), _as_int(max_words)
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise TypeError(f"frames must be an integer, got {frames!r}")
    check_frames(frames)  # before the paper's schedule is worked out for it
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0 (0: no LoRA), got {lora_rank!r}")
    ignored = settings_ignored_by(method, merge_overrides)
    if ignored:
        # The command line and training configs refuse these; from Python a warning says the same.
        warn(f"method {method!r} never reads {', '.join(ignored)}: the model is the same without "
             f"{'it' if len(ignored) == 1 else 'them'}", VideoEncoderWarning)
    if "tome_r" in merge_overrides:
        merge_overrides["tome_r"] = _as_int(merge_overrides["tome_r"])
    for name in ("merge_layers", "clips_joined"):
        value = merge_overrides.get(name)
        if hasattr(value, "tolist"):  # a numpy or torch array
            value = value.tolist()
        if isinstance(value, (list, tuple, range)):
            merge_overrides[name] = tuple(_as_int(item) for item in value)
    if schedule is None and method == "tempme" and "merge_layers" not in merge_overrides and clip.vision.layers < 4:
        # The paper's ClipMe layers are the 4th, 3rd and 2nd from the end.
        raise ScheduleError(f"the paper's schedule needs at least 4 layers, this encoder has {clip.vision.layers}: "
                            "give merge_layers (and clips_joined) for it")
    merge = (schedule or default_merge_config(clip, frames, method)).replace(**merge_overrides)
    if merge.method == "tempme" and merge.clip_pos_embed and merge.cross_merge_ratio == 0 and merge_overrides:
        warn("cross_merge_ratio=0 merges nothing across clips, and clip positional embeddings are added only for "
             "that merge: they stay unused (and untrained); set clip_pos_embed=False "
             "(model.schedule.clip_pos_embed=false; tempme flops --no-clip-pos-embed) to build the same model "
             "without them", VideoEncoderWarning)
    return ModelConfig(clip=clip, merge=merge, lora=LoRAConfig(rank=lora_rank), frames=frames, max_words=max_words)


def create_model(
    config: ModelConfig | CLIPConfig | str = "ViT-B/32",
    method: str | None = None,
    frames: int | None = None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> TempMe:
    """A randomly initialised model. ``config`` is a full ``ModelConfig``, an architecture, or a preset name;
    for the last two, ``method`` (default ``"tempme"``), ``frames`` (default 12) and the other keyword
    arguments go to ``build_config``."""
    device = checked_device(device)
    if isinstance(config, ModelConfig):
        given = [name for name, value in (("method", method), ("frames", frames)) if value is not None] + list(kwargs)
        if given:
            raise TypeError(f"a ModelConfig already holds {', '.join(given)}: change them in the ModelConfig "
                            "(dataclasses.replace) or pass an architecture or preset name instead")
    else:
        config = build_config(config, method=method, frames=12 if frames is None else frames, **kwargs)
    return TempMe(config).to(device)


def load_model(
    weights: str | Path,
    method: str | None = None,
    frames: int | None = None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> TempMe:
    """Load CLIP weights (OpenAI, open_clip, Hugging Face, the authors' or tempme checkpoints) or a preset name.

    The architecture is read from the weights. A tempme checkpoint brings its own method, frame count
    and schedule: ``method`` and ``frames`` default to its own, schedule settings given here change
    only those settings, and another method or frame count starts from the paper's schedule for it
    (the checkpoint's clip positional embeddings then load only where they fit, with a warning).
    Other weights default to ``method="tempme"`` and the paper's schedule. LoRA and clip positional
    embeddings found in the weights are loaded; otherwise they keep their initial values (LoRA B = 0,
    CPE = 0), which leaves CLIP's outputs unchanged. An adapters-only file is refused, naming the file
    (a ``tempme train`` run loads with ``tempme_train.modeling.load_trained_model``).
    """
    from .weights import ADAPTERS_ONLY, WeightsError, load_state_dict_into, load_weights, without_unfitting_clip_pos_embeds

    device = checked_device(device)  # before the weights are read
    loaded = load_weights(weights)
    if all(is_adapter_parameter(name) for name in loaded.state_dict):  # refused before a model is built from its record
        raise WeightsError(f"{loaded.path}: {ADAPTERS_ONLY}")
    saved = loaded.model_config
    if method is None:
        method = saved.merge.method if saved else "tempme"
    if frames is None:
        frames = (saved.frames if saved else None) or loaded.frames or 12
    own_schedule = saved is not None and (method, frames) == (saved.merge.method, saved.frames)
    if own_schedule and not kwargs:
        config = saved
    else:
        kwargs.setdefault("lora_rank", saved.lora.rank if saved else loaded.lora_rank or 8)
        if saved is not None:
            kwargs.setdefault("max_words", saved.max_words)
        schedule = saved.merge if own_schedule else None
        config = build_config(loaded.clip_config, method=method, frames=frames, schedule=schedule, **kwargs)
    model = TempMe(config)
    state = loaded.state_dict
    if saved is not None and config != saved:
        state = without_unfitting_clip_pos_embeds(model, state, weights)
    try:
        load_state_dict_into(model, state)
    except WeightsError as error:
        raise WeightsError(f"{loaded.path}: {error}") from None
    return model.to(device).eval()
