"""Recall@k on hand-built score matrices, checked against values worked out by hand."""

import pytest
import torch

from mmpretrain.evaluation.retrieval import (
    pessimistic_ranks,
    rerank_scores,
    retrieval_metrics,
    retrieval_ranks,
    topk_candidates,
)

# 3 unique images, 5 captions: image 0 has captions 0,1; image 1 has caption 2; image 2 has 3,4.
CAPTION_IMAGE = torch.tensor([0, 0, 1, 2, 2])
# scores[image, caption]; integers so that ties are exact.
SCORES = torch.tensor(
    [
        [9.0, 1.0, 8.0, 3.0, 2.0],
        [5.0, 6.0, 4.0, 7.0, 1.0],
        [2.0, 2.0, 9.0, 5.0, 5.0],
    ]
)


def test_ranks_by_hand_several_captions_per_image():
    i2t, t2i = retrieval_ranks(SCORES, CAPTION_IMAGE)
    # image 0: best right caption 9, no wrong >= 9 -> 0
    # image 1: right caption scores 4; wrong 5, 6, 7 are above -> 3
    # image 2: right captions 5, 5 (tied with each other: no penalty); wrong 9 above -> 1
    assert i2t.tolist() == [0, 3, 1]
    # caption 0: column [9,5,2], right image 0 -> 0
    # caption 1: column [1,6,2], right 1; wrong 6,2 -> 2
    # caption 2: column [8,4,9], right 4; wrong 8,9 -> 2
    # caption 3: column [3,7,5], right 5; wrong 7 -> 1
    # caption 4: column [2,1,5], right 5 -> 0
    assert t2i.tolist() == [0, 2, 2, 1, 0]


def test_recall_values_by_hand():
    m = retrieval_metrics(SCORES, CAPTION_IMAGE, ks=[1, 2, 5])
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0)
    assert m["t2i_R@1"] == pytest.approx(40.0)
    assert m["t2i_R@2"] == pytest.approx(60.0)
    assert m["t2i_R@5"] == pytest.approx(100.0)
    expected_mean = (100 / 3 + 200 / 3 + 100 + 40 + 60 + 100) / 6
    assert m["mean_recall"] == pytest.approx(expected_mean)
    assert m["num_images"] == 3 and m["num_captions"] == 5
    # median of 1-based ranks: i2t [1,4,2] -> 2; t2i [1,3,3,2,1] -> 2
    assert m["i2t_median_rank"] == 2.0 and m["t2i_median_rank"] == 2.0


def test_any_caption_counts_for_an_image_query():
    # image 0's second caption is the top hit, its first is last: still a hit at 1.
    scores = torch.tensor([[0.0, 9.0, 5.0], [1.0, 1.0, 8.0]])
    i2t, _ = retrieval_ranks(scores, torch.tensor([0, 0, 1]))
    assert i2t.tolist() == [0, 0]


def test_ties_count_against_the_query_whatever_the_order():
    # The right item tied with one wrong item that comes before it and one that comes after it.
    scores = torch.tensor([[3.0, 3.0, 3.0, 1.0]])
    positive = torch.tensor([[False, True, False, False]])
    assert pessimistic_ranks(scores, positive).tolist() == [2]
    # A constant matrix: every query ranks behind every wrong candidate.
    flat = torch.zeros(3, 5)
    i2t, t2i = retrieval_ranks(flat, CAPTION_IMAGE)
    assert i2t.tolist() == [3, 4, 3]  # wrong captions per image: 5 - #own captions
    assert t2i.tolist() == [2, 2, 2, 2, 2]
    m = retrieval_metrics(flat, CAPTION_IMAGE, ks=[1])
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0


def test_right_items_tied_with_each_other_do_not_hurt():
    scores = torch.tensor([[4.0, 4.0, 4.0, 2.0]])
    positive = torch.tensor([[True, True, True, False]])
    assert pessimistic_ranks(scores, positive).tolist() == [0]


def test_query_without_a_right_item_is_an_error():
    with pytest.raises(ValueError):
        pessimistic_ranks(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))


def test_topk_candidates_break_ties_by_lower_index():
    scores = torch.tensor([[1.0, 5.0, 5.0, 7.0, 5.0]])
    assert topk_candidates(scores, 3).tolist() == [[3, 1, 2]]
    assert topk_candidates(scores, 10).shape == (1, 5)


def test_rerank_moves_rescored_candidates_above_the_rest():
    # Top-3 by contrast, then re-scored: image 0 keeps its right caption first, image 2's right
    # caption 3 overtakes the wrong caption 2, image 1's right caption (4th by contrast) is not a
    # candidate and so stays behind all three.
    cand = topk_candidates(SCORES, 3)
    assert cand.tolist() == [[0, 2, 3], [3, 1, 0], [2, 3, 4]]
    # new scores per candidate (higher = better)
    new = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 0.2], [0.0, 3.0, 1.0]])
    re = rerank_scores(SCORES, cand, new)
    i2t, _ = retrieval_ranks(re, CAPTION_IMAGE)
    # image 0: candidate 0 (right) scored best -> 0
    # image 1: right caption 2 not among candidates -> behind all 3 candidates, and behind
    #          nothing else (caption 4 scores 1 < 4) -> 3
    # image 2: candidate 3 (right) best -> 0
    assert i2t.tolist() == [0, 3, 0]
    # a non-candidate with a high raw score never jumps above a re-scored candidate
    assert float(re[1, 2]) < float(re[1, 3:4].min())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        pessimistic_ranks(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_row_chunking_gives_the_same_ranks(monkeypatch):
    from mmpretrain.evaluation import retrieval

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (37, 53), generator=g).float()  # many ties
    caption_image = torch.randint(0, 37, (53,), generator=g)
    caption_image[:37] = torch.arange(37)  # every image has a caption
    whole = retrieval_ranks(scores, caption_image), topk_candidates(scores, 5)
    chunks = retrieval._row_chunks
    monkeypatch.setattr(retrieval, "_row_chunks", lambda shape, max_elements=0: chunks(shape, 100))
    assert len(retrieval._row_chunks(scores.shape)) > 1
    chunked = retrieval_ranks(scores, caption_image), topk_candidates(scores, 5)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], chunked[0]))
    assert torch.equal(whole[1], chunked[1])
