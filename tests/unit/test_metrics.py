"""Retrieval metric tests; every expected value is worked out by hand."""

import math
import warnings

import numpy as np
import pytest
import torch

from tempme.retrieval import (
    compute_ranks,
    format_metrics_table,
    retrieval_metrics,
    similarity,
    text_to_video_metrics,
    video_to_text_metrics,
)

# Query i matches gallery i (default ground truth).
SIM_4X4 = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],  # gt 0.9, nothing higher            -> rank 0
        [0.5, 0.9, 0.6, 0.1],  # gt 0.9, nothing higher            -> rank 0
        [0.7, 0.8, 0.6, 0.9],  # gt 0.6 < 0.7, 0.8, 0.9            -> rank 3
        [0.2, 0.9, 0.1, 0.3],  # gt 0.3 < 0.9                      -> rank 1
    ]
)

# 6 captions over 3 videos, two captions each.
CAPTION_TO_VIDEO = [0, 0, 1, 1, 2, 2]
SIM_6X3 = np.array(
    [
        # v0    v1    v2
        [0.1, 0.7, 0.9],  # caption 0 (video 0)
        [0.9, 0.6, 0.1],  # caption 1 (video 0)
        [0.8, 0.5, 0.8],  # caption 2 (video 1)
        [0.2, 0.2, 0.7],  # caption 3 (video 1)
        [0.3, 0.1, 0.2],  # caption 4 (video 2)
        [0.4, 0.0, 0.65],  # caption 5 (video 2)
    ]
)


def test_ranks_4x4():
    assert compute_ranks(SIM_4X4).tolist() == [0, 0, 3, 1]


def test_metrics_4x4():
    m = retrieval_metrics(SIM_4X4)
    # ranks [0, 0, 3, 1]: two of four at rank 0, all four below 5.
    assert m["R1"] == pytest.approx(50.0)
    assert m["R5"] == pytest.approx(100.0)
    assert m["R10"] == pytest.approx(100.0)
    assert m["R50"] == pytest.approx(100.0)
    # sorted ranks [0, 0, 1, 3]: median 0.5 -> MdR 1.5; mean 4/4 = 1 -> MnR 2.
    assert m["MdR"] == pytest.approx(1.5)
    assert m["MnR"] == pytest.approx(2.0)
    assert m["RSum"] == pytest.approx(250.0)
    assert m["num_queries"] == 4


def test_tensor_input_matches_numpy():
    assert retrieval_metrics(torch.tensor(SIM_4X4)) == retrieval_metrics(SIM_4X4)


def _sim_with_ranks(ranks, num_gallery):
    """One row per query: gt (index 0) scores 0.5, the next r items score 1.0."""
    sim = np.zeros((len(ranks), num_gallery))
    sim[:, 0] = 0.5
    for q, r in enumerate(ranks):
        sim[q, 1 : 1 + r] = 1.0
    return sim


def test_recall_at_k_percentages():
    ranks = [0, 0, 3, 4, 5, 9, 10, 55]
    sim = _sim_with_ranks(ranks, num_gallery=60)
    m = retrieval_metrics(sim, gt=[0] * len(ranks))
    assert compute_ranks(sim, [0] * len(ranks)).tolist() == ranks
    assert m["R1"] == pytest.approx(25.0)  # 2 of 8 at rank 0
    assert m["R5"] == pytest.approx(50.0)  # 0, 0, 3, 4
    assert m["R10"] == pytest.approx(75.0)  # ... + 5, 9
    assert m["R50"] == pytest.approx(87.5)  # ... + 10; 55 misses
    assert m["MdR"] == pytest.approx(5.5)  # median (4 + 5) / 2 = 4.5, + 1
    assert m["MnR"] == pytest.approx(11.75)  # mean 86 / 8 = 10.75, + 1
    assert m["RSum"] == pytest.approx(150.0)  # 25 + 50 + 75
    assert m["num_queries"] == 8


@pytest.mark.filterwarnings("ignore:.*score their match exactly")  # tied by design
def test_ties_are_optimistic_and_one_rank_per_query():
    sim = np.array(
        [
            [0.5, 0.5, 0.5, 0.1],  # gt 1 ties with items 0 and 2; none strictly higher -> 0
            [0.9, 0.3, 0.3, 0.3],  # gt 3 ties with 1 and 2; only 0.9 higher -> 1
        ]
    )
    with pytest.warns(UserWarning, match="2 of 2 queries score their match exactly as high as other items"):
        assert compute_ranks(sim, [1, 3]).tolist() == [0, 1]
    m = retrieval_metrics(sim, [1, 3])
    assert m["R1"] == pytest.approx(50.0)
    assert m["num_queries"] == 2


@pytest.mark.filterwarnings("ignore:.*score their match exactly")  # tied by design
def test_text_to_video_with_multiple_captions_per_video():
    # caption 0: gt 0.1 < 0.7, 0.9        -> 2
    # caption 1: gt 0.9 highest           -> 0
    # caption 2: gt 0.5 < 0.8, 0.8        -> 2
    # caption 3: gt 0.2 < 0.7 (tie 0.2)   -> 1
    # caption 4: gt 0.2 < 0.3             -> 1
    # caption 5: gt 0.65 highest          -> 0
    assert compute_ranks(SIM_6X3, CAPTION_TO_VIDEO).tolist() == [2, 0, 2, 1, 1, 0]
    m = text_to_video_metrics(SIM_6X3, CAPTION_TO_VIDEO)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == pytest.approx(100.0)
    assert m["MdR"] == pytest.approx(2.0)  # sorted [0,0,1,1,2,2], median 1
    assert m["MnR"] == pytest.approx(2.0)  # mean 6 / 6 = 1
    assert m["num_queries"] == 6


def test_video_to_text_uses_best_caption():
    # Columns of SIM_6X3 rank the six captions for each video:
    # v0 [0.1, 0.9, 0.8, 0.2, 0.3, 0.4]: caption 0 -> 5, caption 1 -> 0; best 0
    # v1 [0.7, 0.6, 0.5, 0.2, 0.1, 0.0]: caption 2 -> 2, caption 3 -> 3; best 2
    # v2 [0.9, 0.1, 0.8, 0.7, 0.2, 0.65]: caption 4 -> 4, caption 5 -> 3; best 3
    m = video_to_text_metrics(SIM_6X3, CAPTION_TO_VIDEO)
    assert m["num_queries"] == 3
    assert m["R1"] == pytest.approx(100 / 3)  # only v0; first-caption-only would give 0
    assert m["R5"] == pytest.approx(100.0)
    assert m["MdR"] == pytest.approx(3.0)  # sorted [0, 2, 3], median 2
    assert m["MnR"] == pytest.approx(8 / 3)  # mean 5 / 3, + 1
    assert m["RSum"] == pytest.approx(100 / 3 + 200)


@pytest.mark.filterwarnings("ignore:.*score their match exactly")  # tied by design
def test_video_to_text_default_is_transpose():
    # SIM_4X4 transposed, gt on the diagonal:
    # v0 [0.9, 0.5, 0.7, 0.2] -> 0; v1 [0.1, 0.9, 0.8, 0.9] -> 0 (tie);
    # v2 [0.2, 0.6, 0.6, 0.1] -> 0 (tie); v3 [0.3, 0.1, 0.9, 0.3] -> 1
    m = video_to_text_metrics(SIM_4X4)
    assert m["R1"] == pytest.approx(75.0)
    assert m["MnR"] == pytest.approx(1.25)


def test_similarity_is_scaled_cosine():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    video = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    expected = 100.0 * torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(similarity(text, video), expected)
    torch.testing.assert_close(similarity(text, video, scale=1.0), expected / 100.0)


def test_similarity_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="D=2.*D=3"):
        similarity(torch.ones(2, 2), torch.ones(2, 3))


def test_gt_length_mismatch():
    with pytest.raises(ValueError, match="2 entries.*3 queries"):
        retrieval_metrics(SIM_4X4[:3, :3], [0, 1])


@pytest.mark.parametrize("bad", [4, -1])
def test_gt_index_out_of_range(bad):
    with pytest.raises(ValueError, match=f"gt index {bad} .*range \\[0, 4\\)"):
        retrieval_metrics(SIM_4X4, [0, 1, bad, 3])


def test_default_gt_needs_square_matrix():
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(SIM_6X3)


def test_caption_to_video_errors():
    with pytest.raises(ValueError, match="5 entries.*6 captions"):
        text_to_video_metrics(SIM_6X3, CAPTION_TO_VIDEO[:5])
    with pytest.raises(ValueError, match="video 3, out of range"):
        video_to_text_metrics(SIM_6X3, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="video 2 has no caption"):
        video_to_text_metrics(SIM_6X3, [0, 0, 1, 1, 1, 1])


def test_nan_similarity_rejected():
    sim = SIM_4X4.copy()
    sim[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim)


@pytest.mark.filterwarnings("ignore:.*score their match exactly")  # tied by design
def test_format_metrics_table():
    table = format_metrics_table(
        text_to_video_metrics(SIM_6X3, CAPTION_TO_VIDEO),
        video_to_text_metrics(SIM_6X3, CAPTION_TO_VIDEO),
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["Direction", "R@1", "R@5", "R@10", "R@50", "MdR", "MnR", "RSum"]
    assert lines[2].split()[:2] == ["Text->Video", "33.3"]
    assert lines[3].split() == [
        "Video->Text", "33.3", "100.0", "100.0", "100.0", "3.0", "2.7", "233.3"
    ]
    assert len({len(line) for line in lines}) == 1  # columns aligned


def test_similarity_of_half_precision_queries_against_float32_videos():
    torch.manual_seed(0)
    text, video = torch.randn(3, 8), torch.randn(5, 8)
    mixed = similarity(text.half(), video)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, similarity(text.half().float(), video))


def test_contrastive_loss_takes_a_plain_number_as_logit_scale():
    from tempme.retrieval import contrastive_loss

    torch.manual_seed(0)
    text, video = torch.randn(4, 8), torch.randn(4, 8)
    assert contrastive_loss(text, video, math.log(100)) == contrastive_loss(text, video, torch.tensor(math.log(100)))


def test_a_collapsed_model_is_warned_about_since_ties_count_in_its_favour():
    texts = torch.randn(50, 8)
    with pytest.warns(UserWarning, match="50 of 50 queries score their match exactly as high as other items"):
        assert text_to_video_metrics(similarity(texts, torch.ones(50, 8)))["R1"] == 100.0
    videos = torch.randn(50, 8)
    videos[1] = videos[0]  # one duplicate video: 2 tied queries of 50, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_to_video_metrics(similarity(texts, videos))


def test_no_queries_is_one_clear_error_and_no_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="zero queries"):
            retrieval_metrics(torch.zeros(0, 0))
