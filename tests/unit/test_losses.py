"""Single-process checks of mmpretrain.losses (no process group: every gather is the identity)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmpretrain import distributed as D
from mmpretrain import losses as L
from mmpretrain.models.config import LossConfig


def _emb(n, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1))


def test_single_process_helpers_are_identity():
    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main()
    x = torch.randn(4, 3, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    torch.testing.assert_close(D.fetch_rows(x, torch.tensor([2, 0])), x.detach()[[2, 0]])
    torch.testing.assert_close(D.global_mean(torch.tensor(3.0)), torch.tensor(3.0))


def test_info_nce_matches_naive_formula():
    img, txt = _emb(5)
    scale = 10.0
    loss = L.info_nce(img, txt, torch.tensor([scale], dtype=torch.float64))
    s = scale * img @ txt.t()
    i2t = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(5)) / 5
    t2i = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(5)) / 5
    torch.testing.assert_close(loss, 0.5 * (i2t + t2i))
    # perfect alignment with a large scale gives a small loss
    assert float(L.info_nce(img, img, 100.0)) < float(loss)


def test_token_info_nce_matches_the_late_interaction_formula():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 5, 6, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 3, 6, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    scale = 7.0
    s = torch.zeros(4, 4, dtype=torch.float64)  # s[t, i]: caption t's tokens, each at its best image token
    for t in range(4):
        for i in range(4):
            best = (txt[t] @ img[i].t()).amax(dim=1)
            s[t, i] = best[mask[t].bool()].mean()
    torch.testing.assert_close(L.late_scores(txt, mask, img), s)
    torch.testing.assert_close(L.late_scores(txt, mask, img, max_elems=1), s)  # one image per chunk
    s = scale * s
    t2i = -sum(s[t, t] - torch.logsumexp(s[t], 0) for t in range(4)) / 4
    i2t = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(4)) / 4
    got = L.token_info_nce(img, txt, mask, torch.tensor(scale, dtype=torch.float64), gather=False)
    torch.testing.assert_close(got, 0.5 * (i2t + t2i))
    # padding tokens do not count: changing them changes nothing
    txt2 = txt.clone()
    txt2[2, 1:] = -txt2[2, 1:]
    torch.testing.assert_close(L.late_scores(txt2, mask, img), L.late_scores(txt, mask, img))


def test_feature_cache_single_process_equals_full_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 4, generator=g, dtype=torch.float64)

    def run(m):
        w = w0.clone().requires_grad_(True)
        ls = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
        enc = lambda a: F.normalize(a @ w, dim=-1)  # noqa: E731
        if m == 1:
            loss = L.info_nce(enc(x), enc(y), ls.exp())
            loss.backward()
            return [loss.detach()], w.grad, ls.grad
        b = 8 // m
        with torch.no_grad():
            cache = L.FeatureCache.from_local([enc(x[i * b:(i + 1) * b]) for i in range(m)],
                                              [enc(y[i * b:(i + 1) * b]) for i in range(m)])
        vals = []
        for i in range(m):
            loss = L.info_nce(enc(x[i * b:(i + 1) * b]), enc(y[i * b:(i + 1) * b]), ls.exp(), cache=cache.at(i, b))
            (loss / m).backward()
            vals.append(loss.detach())
        return vals, w.grad, ls.grad

    full_vals, gw, gs = run(1)
    for m in (2, 4):
        vals, gw_m, gs_m = run(m)
        for v in vals:
            torch.testing.assert_close(v, full_vals[0])
        torch.testing.assert_close(gw_m, gw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gs_m, gs, rtol=1e-10, atol=1e-12)


def test_triplet_hardest_matches_manual():
    img, txt = _emb(4, seed=2)
    margin = 0.5
    loss = L.triplet_loss(img, txt, margin=margin)
    s = img @ txt.t()
    ref = 0.0
    for i in range(4):
        ref += max(max(margin - s[i, i] + s[i, j], 0) for j in range(4) if j != i) / 4
        ref += max(max(margin - s[i, i] + s[j, i], 0) for j in range(4) if j != i) / 4
    torch.testing.assert_close(loss, torch.as_tensor(ref, dtype=loss.dtype))
    # summed (not hardest) is at least the hardest
    assert float(L.triplet_loss(img, txt, margin=margin, hardest=False)) >= float(loss)
    # same image id for everything: no valid negative, loss 0
    assert float(L.triplet_loss(img, txt, margin=margin, image_ids=torch.zeros(4, dtype=torch.long))) == 0.0


def _sample(sim, ids_l, ids_g, seed=0, floor=1e-4, row_offset=None):
    return L.sample_itm_negatives(sim, sim.clone(), ids_l, ids_g, torch.Generator().manual_seed(seed), floor,
                                  row_offset=row_offset)


def test_sampler_never_returns_positive_or_same_image():
    n = 12
    ids = torch.arange(n) // 3  # three captions per image
    for seed in range(20):
        sim = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 5
        sim += 20 * torch.eye(n)  # the positive is by far the most similar
        neg = _sample(sim, ids, ids, seed)
        assert (ids[neg.text_idx] != ids).all() and (ids[neg.image_idx] != ids).all()
        assert (neg.text_label == 0).all() and (neg.image_label == 0).all()
        assert neg.text_idx.shape == (n,) and neg.image_idx.shape == (n,)


def test_sampler_prefers_hard_negatives():
    n = 6
    ids = torch.arange(n)
    sim = torch.zeros(n, n)
    sim[:, 4] = 8.0  # column 4 is the hard negative of every row (except row 4)
    counts = torch.zeros(n)
    for seed in range(50):
        counts += torch.bincount(_sample(sim, ids, ids, seed).text_idx, minlength=n)
    assert counts[4] > 0.8 * counts.sum() * (n - 1) / n


def test_sampler_split_rows_equals_global():
    """Rows sampled in two halves (as two ranks do) choose what one process chooses."""
    n = 10
    ids = torch.arange(n) // 2
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(3))
    full = _sample(sim, ids, ids, seed=7)
    for r in range(2):
        part = _sample(sim[r * 5:(r + 1) * 5], ids[r * 5:(r + 1) * 5], ids, seed=7, row_offset=r * 5)
        assert torch.equal(part.text_idx, full.text_idx[r * 5:(r + 1) * 5])
        assert torch.equal(part.image_idx, full.image_idx[r * 5:(r + 1) * 5])


def test_sampler_fallbacks_keep_labels_correct():
    # B = 1 (world batch of one): the only candidate is the positive itself, labelled 1
    neg = _sample(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([0]))
    assert neg.text_idx.tolist() == [0] and neg.text_label.tolist() == [1] and neg.image_label.tolist() == [1]
    # every sample shows the same image: another index is chosen, labelled 1 (it matches)
    ids = torch.zeros(4, dtype=torch.long)
    neg = _sample(torch.randn(4, 4), ids, ids)
    assert (neg.text_idx != torch.arange(4)).all() and (neg.text_label == 1).all()
    # non-finite similarities: uniform fallback over the other columns, labels from image ids
    ids = torch.arange(4)
    neg = _sample(torch.full((4, 4), float("nan")), ids, ids)
    assert (neg.text_idx != torch.arange(4)).all() and (neg.text_label == 0).all()
    labels = L.itm_labels(neg)
    assert labels.tolist()[:4] == [1, 1, 1, 1] and labels.shape == (12,)


def test_itm_loss_and_combined():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([1, 0, 0])
    loss, acc = L.itm_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert math.isclose(float(acc), 2 / 3, rel_tol=1e-6)
    cfg = LossConfig(contrastive_weight=2.0, itm_weight=0.5)
    itc = torch.tensor(1.5, requires_grad=True)
    itm = torch.tensor(0.4, requires_grad=True)
    out = L.combined({"loss_itc": itc, "loss_itm": itm, "itm_acc": acc}, cfg)
    torch.testing.assert_close(out["loss"], torch.tensor(2 * 1.5 + 0.5 * 0.4))
    assert out["loss"].requires_grad and not out["loss_itc"].requires_grad
    out = L.combined({"loss_itc": itc}, LossConfig(itm_weight=0.0))
    assert set(out) == {"loss", "loss_itc"}


def test_itm_rank_loss_orders_each_row_and_skips_duplicate_negatives():
    # 2 rows: match log-odds s = logit[1] - logit[0]; order [positives, text negatives, image negatives]
    s = torch.tensor([2.0, 0.5, 1.0, 3.0, -1.0, 0.0], requires_grad=True)
    logits = torch.stack([torch.zeros(6), s], dim=-1)
    labels = torch.tensor([1, 1, 0, 1, 0, 0])  # row 1's text negative is a duplicate positive: left out
    loss, acc = L.itm_rank_loss(logits, labels)
    pairs = [(2.0, 1.0), (2.0, -1.0), (0.5, 0.0)]  # (positive, negative) of the 3 valid pairs
    want = sum(F.softplus(torch.tensor(n - p)) for p, n in pairs) / 3
    torch.testing.assert_close(loss, want)
    assert math.isclose(float(acc), 1.0)
    loss.backward()
    assert s.grad[3] == 0 and s.grad[0] < 0 and s.grad[2] > 0
    cfg = LossConfig(itm_weight=0.5, itm_rank_weight=2.0)
    out = L.combined({"loss_itc": torch.tensor(1.0), "loss_itm": torch.tensor(0.4), "loss_itm_rank": loss}, cfg)
    torch.testing.assert_close(out["loss"], 1.0 + 0.5 * 0.4 + 2.0 * loss.detach())
