"""The contrastive objective: symmetric InfoNCE over matched text-video pairs (SPEC section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
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
    logits = logit_scale.detach().float().exp() * text @ video.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
