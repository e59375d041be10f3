"""Text-video retrieval similarity and ranking metrics.

Follows the CLIP4Clip / TempMe evaluation protocol: similarity is
``100 * cosine``; text-to-video (t2v) ranks videos for each caption on ``S``,
video-to-text (v2t) ranks captions for each video on ``S^T``. Reported
metrics are R@1/5/10/50 (percent), median rank MdR and mean rank MnR (both
1-based) and RSum = R@1 + R@5 + R@10. ``contrastive_loss`` is the training objective on the same
similarities.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .userwarnings import SharedWarning, warn

GroundTruth = Union[Sequence[int], Sequence[Sequence[int]]]

RECALL_KS = (1, 5, 10, 50)


def similarity(
    text_emb: torch.Tensor, video_emb: torch.Tensor, scale: float = 100.0
) -> torch.Tensor:
    """Scaled cosine similarity between every text and every video.

    Args:
        text_emb: [Nt, D] text embeddings.
        video_emb: [Nv, D] video embeddings.
        scale: multiplier on the cosine (CLIP's logit scale at evaluation).

    Returns:
        [Nt, Nv] tensor of ``scale * cos(text_i, video_j)``.
    """
    if text_emb.dim() != 2 or video_emb.dim() != 2:
        raise ValueError(
            f"expected 2-D embeddings, got text {tuple(text_emb.shape)} "
            f"and video {tuple(video_emb.shape)}"
        )
    if text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(
            f"embedding sizes differ: text D={text_emb.shape[1]}, video D={video_emb.shape[1]}"
        )
    if text_emb.dtype != video_emb.dtype:  # e.g. half-precision queries against a float32 index
        dtype = torch.promote_types(text_emb.dtype, video_emb.dtype)
        text_emb, video_emb = text_emb.to(dtype), video_emb.to(dtype)
    return scale * F.normalize(text_emb, dim=-1) @ F.normalize(video_emb, dim=-1).T


def _as_numpy(sim: np.ndarray | torch.Tensor) -> np.ndarray:
    """[Nq, Ng] float64 array from a tensor or array, validated."""
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().to("cpu", torch.float64).numpy()
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, gallery], got shape {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN; ranks would be meaningless")
    return sim


def _gt_lists(gt: GroundTruth | None, num_queries: int, num_gallery: int) -> list[list[int]]:
    """Normalise ground truth to one non-empty list of gallery indices per query."""
    if gt is None:
        if num_queries != num_gallery:
            raise ValueError(
                f"default ground truth (query i matches gallery i) needs a square matrix, "
                f"got {num_queries} queries x {num_gallery} gallery items"
            )
        return [[i] for i in range(num_queries)]
    if len(gt) != num_queries:
        raise ValueError(f"gt has {len(gt)} entries but similarity has {num_queries} queries")
    lists = []
    for q, items in enumerate(gt):
        items = [int(items)] if np.ndim(items) == 0 else [int(i) for i in items]
        if not items:
            raise ValueError(f"query {q} has no ground-truth gallery item")
        for i in items:
            if not 0 <= i < num_gallery:
                raise ValueError(
                    f"gt index {i} for query {q} is out of range [0, {num_gallery})"
                )
        lists.append(items)
    return lists


def compute_ranks(sim: np.ndarray | torch.Tensor, gt: GroundTruth | None = None) -> np.ndarray:
    """0-based rank of the best-placed ground-truth item for each query.

    The rank is the number of gallery items scoring strictly higher than the
    ground truth, so ties are resolved optimistically and deterministically
    (a ground-truth item tied with others gets the best of the tied ranks).
    CLIP4Clip instead emits one entry per tied position, which changes the
    number of queries; we deliberately keep exactly one rank per query.

    With several ground-truth items the best (lowest) rank counts; that is
    the number of items strictly above the highest-scoring ground truth.

    Args:
        sim: [Nq, Ng] similarity, higher is better.
        gt: per query, a gallery index or a sequence of them. ``None`` means
            query i matches gallery i (requires Nq == Ng).

    Returns:
        [Nq] int64 ranks.
    """
    sim = _as_numpy(sim)
    gt_lists = _gt_lists(gt, *sim.shape)
    best_gt_score = np.array([sim[q, items].max() for q, items in enumerate(gt_lists)])
    _warn_if_often_tied(sim, best_gt_score, gt_lists)
    return (sim > best_gt_score[:, None]).sum(axis=1)


# Exact ties come from identical embeddings. Benchmarks hold a few (LSMDC repeats short captions in
# its test set): warned about from this fraction of the queries, which a collapsed model far exceeds.
TIED_QUERIES_WARNED = 0.1


def _warn_if_often_tied(sim: np.ndarray, best_gt_score: np.ndarray, gt_lists: list[list[int]]) -> None:
    """Warn when more than 10% of the queries tie their ground truth with another gallery item:
    ties count in the model's favour, so a model that gives every video the same embedding would
    score R@1 = 100."""
    tied = (sim == best_gt_score[:, None]).sum(axis=1) > np.array([
        np.count_nonzero(sim[q, items] == best_gt_score[q]) for q, items in enumerate(gt_lists)
    ])
    if len(tied) and tied.mean() > TIED_QUERIES_WARNED:
        warn(
            f"{tied.sum()} of {len(tied)} queries score their match exactly as high as other items, and ties "
            "count in the model's favour: identical embeddings (duplicate videos or captions, or a collapsed "
            "model) make these recalls too high",
            SharedWarning,
        )


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    """Recall@k (percent), MdR, MnR (1-based), RSum and query count from [Nq] ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("cannot compute metrics for zero queries")
    metrics = {f"R{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    metrics["MdR"] = float(np.median(ranks) + 1)
    metrics["MnR"] = float(np.mean(ranks) + 1)
    metrics["RSum"] = metrics["R1"] + metrics["R5"] + metrics["R10"]
    metrics["num_queries"] = int(ranks.size)
    return metrics


def retrieval_metrics(sim: np.ndarray | torch.Tensor, gt: GroundTruth | None = None) -> dict:
    """Retrieval metrics for a [Nq, Ng] query-by-gallery similarity matrix.

    See :func:`compute_ranks` for ground truth and tie handling (ties are
    optimistic: rank = count of strictly higher scores).

    Returns:
        dict with "R1", "R5", "R10", "R50" (percent), "MdR" (median rank + 1),
        "MnR" (mean rank + 1), "RSum" (R1 + R5 + R10) and "num_queries".
    """
    return metrics_from_ranks(compute_ranks(sim, gt))


def _check_caption_to_video(
    caption_to_video: Sequence[int], num_captions: int, num_videos: int
) -> None:
    """Raise ValueError unless every caption maps to a valid video index."""
    if len(caption_to_video) != num_captions:
        raise ValueError(
            f"caption_to_video has {len(caption_to_video)} entries "
            f"but similarity has {num_captions} captions"
        )
    for c, v in enumerate(caption_to_video):
        if not 0 <= int(v) < num_videos:
            raise ValueError(f"caption {c} maps to video {v}, out of range [0, {num_videos})")


def text_to_video_metrics(
    sim_t2v: np.ndarray | torch.Tensor, caption_to_video: Sequence[int] | None = None
) -> dict:
    """t2v metrics: each caption retrieves its video.

    Args:
        sim_t2v: [Nt, Nv] caption-by-video similarity.
        caption_to_video: [Nt] video index of each caption; ``None`` means
            caption i describes video i.
    """
    sim = _as_numpy(sim_t2v)
    if caption_to_video is not None:
        _check_caption_to_video(caption_to_video, *sim.shape)
    return retrieval_metrics(sim, caption_to_video)


def video_to_text_metrics(
    sim_t2v: np.ndarray | torch.Tensor, caption_to_video: Sequence[int] | None = None
) -> dict:
    """v2t metrics: each video retrieves any of its captions (best rank counts).

    Args:
        sim_t2v: [Nt, Nv] caption-by-video similarity (transposed internally).
        caption_to_video: [Nt] video index of each caption; ``None`` means
            caption i describes video i.
    """
    sim = _as_numpy(sim_t2v)
    num_captions, num_videos = sim.shape
    if caption_to_video is None:
        return retrieval_metrics(sim.T)
    _check_caption_to_video(caption_to_video, num_captions, num_videos)
    captions_of_video = [[] for _ in range(num_videos)]
    for c, v in enumerate(caption_to_video):
        captions_of_video[int(v)].append(c)
    for v, captions in enumerate(captions_of_video):
        if not captions:
            raise ValueError(f"video {v} has no caption, so it cannot be ranked for v2t")
    return retrieval_metrics(sim.T, captions_of_video)


def format_metrics_table(t2v: dict, v2t: dict) -> str:
    """Aligned text table of t2v and v2t metrics, one row per direction."""
    columns = {
        "R1": "R@1",
        "R5": "R@5",
        "R10": "R@10",
        "R50": "R@50",
        "MdR": "MdR",
        "MnR": "MnR",
        "RSum": "RSum",
    }
    header = ["Direction"] + list(columns.values())
    rows = [
        [name] + [f"{metrics[key]:.1f}" for key in columns]
        for name, metrics in (("Text->Video", t2v), ("Video->Text", v2t))
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        # Left-align the label, right-align numbers so decimals line up.
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


def contrastive_loss(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is (text i, video i); every other pairing in the batch is a negative.

    Args:
        text: ``[B, D]`` text embeddings (any norm).
        video: ``[B, D]`` video embeddings (any norm).
        logit_scale: scalar, the log of the inverse temperature (CLIP's ``ln 100``); frozen in the
            recipe, so it is used as a constant here.

    Returns:
        Scalar ``(CE over rows + CE over columns) / 2`` of ``exp(logit_scale) * t_norm @ v_norm^T``.
        Computed in float32 even under autocast; duplicate videos in a batch are not masked.
    """
    if text.shape != video.shape or text.dim() != 2:
        raise ValueError(f"expected matching [B, D] text and video embeddings, got {list(text.shape)} and {list(video.shape)}")
    text = F.normalize(text.float(), dim=-1)
    video = F.normalize(video.float(), dim=-1)
    logit_scale = torch.as_tensor(logit_scale, device=text.device)
    logits = logit_scale.detach().float().exp() * text @ video.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
