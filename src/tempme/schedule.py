"""The per-layer merge plan, computed once from the configuration and validated there.

The plan fixes, for every layer, what kind of merge it does and how many CLS tokens and clips it
sees. How many tokens each merge removes is computed from tensor shapes during the forward pass,
with the same count functions that ``simulate`` uses here for reporting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import MERGE_METHODS, MergeConfig
from .merging import imgme_count, proportional_count

LayerKind = Literal["plain", "imgme", "clipme", "intra"]


class ScheduleError(ValueError):
    """A merge schedule that cannot run for this model and frame count. ``setting``: the ``MergeConfig``
    field (or ``"frames"``) at fault, where one is, so that a config error can name its key."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


# Far beyond any benchmark's 64: the bound keeps a frame count read from a file (an index, a
# checkpoint's record) from building a model of absurd size.
MAX_FRAMES = 4096


def check_frames(frames: int, name: str = "frames") -> None:
    """Refuse a frame count no model can take, calling it ``name`` (the command line's ``--frames``)."""
    if frames < 1:
        raise ScheduleError(f"{name} must be at least 1, got {frames}", "frames")
    if frames > MAX_FRAMES:
        raise ScheduleError(f"{name} must be at most {MAX_FRAMES}, got {frames}", "frames")


@dataclass(frozen=True)
class LayerPlan:
    """What one layer of the video encoder does.

    - ``plain``: attention and MLP, no merging.
    - ``imgme``: merge ``tome_r`` tokens within each frame between attention and MLP.
    - ``clipme``: join ``clips_joined`` clips, merge across them (hidden-state metric, CPE added),
      then attention, then merge within the new clip (key metric).
    - ``intra``: merge a fraction of each clip's tokens between attention and MLP.
    """

    kind: LayerKind
    clips_in: int  # clips per video entering the layer
    cls_in: int  # CLS tokens per clip entering the layer
    tome_r: int = 0
    clips_joined: int = 1

    @property
    def clips_out(self) -> int:
        return self.clips_in // self.clips_joined

    @property
    def cls_out(self) -> int:
        return self.cls_in * self.clips_joined


def check_setting_types(merge: MergeConfig) -> None:
    """Raise ``ScheduleError`` naming a setting of the wrong type: ``tome_r=2.5`` would fail deep in
    the forward pass, and ``prop_attn="no"`` would quietly count as true."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def check(name: str, valid: bool, expected: str) -> None:
        if not valid:
            raise ScheduleError(f"{name} must be {expected}, got {getattr(merge, name)!r}", name)

    check("tome_r", is_int(merge.tome_r), "an integer")
    for name in ("merge_layers", "clips_joined"):
        value = getattr(merge, name)
        check(name, isinstance(value, (tuple, list)) and all(is_int(item) for item in value), "a sequence of integers")
    for name in ("cross_merge_ratio", "intra_merge_ratio"):
        value = getattr(merge, name)
        check(name, is_int(value) or isinstance(value, float), "a number")
    for name in ("clip_pos_embed", "prop_attn"):
        check(name, isinstance(getattr(merge, name), bool), "True or False")


def check_setting_values(merge: MergeConfig, frames: int) -> None:
    """Raise ``ScheduleError`` for a setting of ``merge`` that no model can run, whatever its depth
    and whatever schedule it started from: a wrong type, an unknown method, a frame count out of
    range, a negative ``tome_r``, a merge ratio outside [0, 1)."""
    check_setting_types(merge)
    if merge.method not in MERGE_METHODS:
        raise ScheduleError(f"unknown merge method {merge.method!r}; choose one of {', '.join(MERGE_METHODS)}", "method")
    check_frames(frames)
    if merge.tome_r < 0:
        raise ScheduleError(f"tome_r must be >= 0, got {merge.tome_r}", "tome_r")
    if merge.method != "tempme":
        return
    for name in ("cross_merge_ratio", "intra_merge_ratio"):
        ratio = getattr(merge, name)
        if not 0.0 <= ratio < 1.0:
            raise ScheduleError(
                f"{name}={ratio} is outside [0, 1): it is the fraction merged "
                f"(retained ratio {1 - ratio:g} must lie in (0, 1])", name
            )


def validate_merge_config(merge: MergeConfig, depth: int | None, frames: int) -> None:
    """Raise ``ScheduleError`` with a readable message if ``merge`` cannot run. ``depth`` None (not
    known yet: weights not read) leaves out the check of the merge layers' range."""
    check_setting_values(merge, frames)
    if merge.method != "tempme":
        return
    layers, joins = tuple(merge.merge_layers), tuple(merge.clips_joined)
    if len(layers) != len(joins):
        raise ScheduleError(
            f"merge_layers {list(layers)} and clips_joined {list(joins)} must have the same length", "clips_joined"
        )
    if not layers:
        raise ScheduleError("method 'tempme' needs at least one merge layer", "merge_layers")
    for layer in layers:
        if layer < 0 or (depth is not None and layer >= depth):
            has = "layers count from 0" if depth is None else f"the encoder has layers 0..{depth - 1}"
            raise ScheduleError(f"merge layer {layer} is out of range: {has}", "merge_layers")
    if list(layers) != sorted(set(layers)):
        raise ScheduleError(f"merge_layers must be strictly increasing, got {list(layers)}", "merge_layers")
    clips = frames
    for layer, joined in zip(layers, joins):
        if joined < 1 or clips % joined:
            raise ScheduleError(
                f"cannot join {joined} clips at layer {layer}: {clips} clips remain "
                f"(frames={frames}, clips_joined={list(joins)}); each step must divide the clip count", "clips_joined"
            )
        clips //= joined


def build_plan(merge: MergeConfig, depth: int, frames: int) -> tuple[LayerPlan, ...]:
    """One ``LayerPlan`` per layer. Validates first, so an impossible schedule fails here, not in forward."""
    validate_merge_config(merge, depth, frames)
    if merge.method == "none":
        return tuple(LayerPlan("plain", clips_in=frames, cls_in=1) for _ in range(depth))
    if merge.method == "tome":
        return tuple(LayerPlan("imgme", clips_in=frames, cls_in=1, tome_r=merge.tome_r) for _ in range(depth))

    joins = dict(zip(merge.merge_layers, merge.clips_joined))
    first_merge = merge.merge_layers[0]
    plan: list[LayerPlan] = []
    clips, cls = frames, 1
    for layer in range(depth):
        if layer < first_merge:
            step = LayerPlan("imgme", clips_in=clips, cls_in=cls, tome_r=merge.tome_r)
        elif layer in joins:
            step = LayerPlan("clipme", clips_in=clips, cls_in=cls, clips_joined=joins[layer])
        else:
            step = LayerPlan("intra", clips_in=clips, cls_in=cls)
        plan.append(step)
        clips, cls = step.clips_out, step.cls_out
    return tuple(plan)


@dataclass(frozen=True)
class LayerTokens:
    """Token bookkeeping of one layer for one video: counts are per clip."""

    layer: int
    kind: LayerKind
    clips: int  # clips after the layer
    attn_tokens: int  # sequence length inside attention
    out_tokens: int  # tokens per clip after the layer
    cls: int  # CLS tokens per clip after the layer
    r_cross: int = 0  # ClipMe cross-clip merge count (r0)
    r: int = 0  # merge after attention (ImgMe r, ClipMe r1, or intra r)


def merge_counts(step: LayerPlan, merge: MergeConfig, tokens: int) -> tuple[int, int]:
    """``(r_cross, r)`` of one layer entered by clips of ``tokens`` tokens (CLS included).

    ``r_cross``: ClipMe's merge across the joined clips before attention (0 in other layers);
    ``r``: the merge after attention (ImgMe's r, ClipMe's r1 or the intra-clip merge), counted on the
    sequence that attention sees. The forward pass and :func:`simulate` both count with this.
    """
    if step.kind == "imgme":
        return 0, imgme_count(tokens, step.cls_in, step.tome_r)
    if step.kind == "clipme":
        joined, cls = tokens * step.clips_joined, step.cls_out
        r_cross = proportional_count(joined, cls, merge.cross_merge_ratio)
        return r_cross, proportional_count(joined - r_cross, cls, merge.intra_merge_ratio)
    if step.kind == "intra":
        return 0, proportional_count(tokens, step.cls_in, merge.intra_merge_ratio)
    return 0, 0


def simulate(plan: tuple[LayerPlan, ...], merge: MergeConfig, tokens_per_frame: int) -> list[LayerTokens]:
    """Token counts layer by layer, as the forward pass will produce them."""
    tokens = tokens_per_frame
    rows = []
    for index, step in enumerate(plan):
        r_cross, r = merge_counts(step, merge, tokens)
        attn = tokens * step.clips_joined - r_cross
        rows.append(LayerTokens(index, step.kind, step.clips_out, attn, attn - r, step.cls_out, r_cross, r))
        tokens = attn - r
    return rows
