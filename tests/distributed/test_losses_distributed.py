"""2 real gloo processes vs one process holding the global batch (float64, tight tolerances).

One spawn runs every distributed case (process start-up dominates the cost); each rank saves
its results and the test process compares them with single-process references.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import _proc
from mmpretrain import distributed as D
from mmpretrain import losses as L
from mmpretrain.models import LossConfig, ModelConfig, build_model

pytestmark = pytest.mark.distributed

WORLD, B, DIM, E = 2, 3, 6, 5
TOL = dict(rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- shared setup

def _tensor_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64)
    wi = torch.randn(DIM, E, generator=g, dtype=torch.float64)
    wt = torch.randn(DIM, E, generator=g, dtype=torch.float64)
    return x, y, wi, wt


def _params(wi, wt):
    pi = wi.clone().requires_grad_(True)
    pt = wt.clone().requires_grad_(True)
    ls = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    return pi, pt, ls


def _model_cfgs(itm_weight=1.0, exchange="all_to_all"):
    mc = ModelConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, embed_dim=8,
                     max_text_length=6)
    lc = LossConfig(itm_weight=itm_weight, itm_exchange=exchange, itm_seed=3, itm_floor=1e-4)
    return mc, lc


def _model(itm_weight=1.0, exchange="all_to_all"):
    torch.manual_seed(1)
    mc, lc = _model_cfgs(itm_weight, exchange)
    return build_model(mc, lc, vocab_size=30).double()


def _model_batch(n):
    g = torch.Generator().manual_seed(5)
    px = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 30, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::2, 4:] = 0
    image_ids = torch.arange(n) // 2  # two captions per image: same-image candidates masked
    return px, ids, mask, image_ids


def _avg_grads(model):
    """DDP-style: mean of the gradients over ranks."""
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(g)
        out[n] = g / WORLD
    return out


def _wrong_variant_loss(img, txt, scale, kind):
    """The two buggy gathers: 'slice' (no-grad gather, local slice put back) and 'rows' (no-grad
    gather, only local rows carry gradient)."""
    r = D.get_rank()
    img_all, txt_all = D.all_gather_no_grad(img), D.all_gather_no_grad(txt)
    if kind == "slice":
        img_all = torch.cat([img_all[:r * B], img, img_all[(r + 1) * B:]])
        txt_all = torch.cat([txt_all[:r * B], txt, txt_all[(r + 1) * B:]])
    labels = r * B + torch.arange(B)
    return 0.5 * (F.cross_entropy(scale * img @ txt_all.t(), labels) + F.cross_entropy(scale * txt @ img_all.t(), labels))


# ----------------------------------------------------------------------------- worker

def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    res = {}
    sl = slice(rank * B, (rank + 1) * B)

    # 1) InfoNCE on plain tensors: correct and the two wrong variants
    x, y, wi, wt = _tensor_problem()
    for kind in ("correct", "slice", "rows"):
        pi, pt, ls = _params(wi, wt)
        img, txt = F.normalize(x[sl] @ pi, dim=-1), F.normalize(y[sl] @ pt, dim=-1)
        if kind == "correct":
            loss = L.info_nce(img, txt, ls.exp())
        else:
            loss = _wrong_variant_loss(img, txt, ls.exp(), kind)
        loss.backward()
        grads = []
        for p in (pi, pt, ls):
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads.append(g / WORLD)
        res[f"nce_{kind}"] = (loss.detach(), grads)

    # 2) triplet (hardest negative, image ids masked)
    pi, pt, ls = _params(wi, wt)
    img, txt = F.normalize(x[sl] @ pi, dim=-1), F.normalize(y[sl] @ pt, dim=-1)
    ids = (torch.arange(WORLD * B) // 2)[sl]
    loss = L.triplet_loss(img, txt, margin=0.3, image_ids=ids)
    loss.backward()
    res["triplet"] = (loss.detach(), [_reduce(pi.grad), _reduce(pt.grad)])

    # 3) full model: InfoNCE + ITM with both exchange methods; same negatives as one process
    px, ids_, mask, image_ids = _model_batch(WORLD * B)
    for exchange in ("all_to_all", "all_gather"):
        model = _model(1.0, exchange)
        out = model(px[sl], ids_[sl], mask[sl], image_ids[sl])
        out["loss"].backward()
        res[f"model_{exchange}"] = ({k: v.detach() for k, v in out.items()}, _avg_grads(model))

    # 4) feature cache: 2 micro-batches of 2 per rank (global accumulated batch of 8)
    m, b = 2, 2
    px, ids_, mask, image_ids = _model_batch(WORLD * m * b)
    blk = slice(rank * m * b, (rank + 1) * m * b)
    model = _model(0.0)
    with torch.no_grad():
        feats = [model(px[blk][i * b:(i + 1) * b], ids_[blk][i * b:(i + 1) * b], mask[blk][i * b:(i + 1) * b],
                       mode="features") for i in range(m)]
    cache = L.FeatureCache.from_local([f["image_emb"] for f in feats], [f["text_emb"] for f in feats])
    values = []
    for i in range(m):
        mb = slice(i * b, (i + 1) * b)
        out = model(px[blk][mb], ids_[blk][mb], mask[blk][mb], image_ids[blk][mb], feature_cache=cache.at(i, b))
        (out["loss"] / m).backward()
        values.append(out["loss_itc"])
    res["cache"] = (values, _avg_grads(model))

    # 4b) feature cache without gathering (loss.gather=false): each rank's own block only
    g = torch.Generator().manual_seed(10 + rank)
    xe = F.normalize(torch.randn(m * b, 8, generator=g, dtype=torch.float64), dim=-1)
    ye = F.normalize(torch.randn(m * b, 8, generator=g, dtype=torch.float64), dim=-1)
    local = L.FeatureCache.from_local([xe[:b], xe[b:]], [ye[:b], ye[b:]], gather=False)
    vals = [L.info_nce(xe[i * b:(i + 1) * b], ye[i * b:(i + 1) * b], 10.0, gather=False, cache=local.at(i, b))
            for i in range(m)]
    res["cache_nogather"] = (torch.stack(vals), L.info_nce(xe, ye, 10.0, gather=False))

    # 5) fetch_rows: uneven requests (rank 0 asks only rank 1's rows, rank 1 mixes)
    local = torch.arange(B * 4, dtype=torch.float64).view(B, 4) + 100 * rank
    req = torch.tensor([3, 4, 5]) if rank == 0 else torch.tensor([5, 0, 2])
    res["fetch"] = (D.fetch_rows(local, req, "all_to_all"), D.fetch_rows(local, req, "all_gather"))

    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _reduce(g):
    g = g.clone()
    torch.distributed.all_reduce(g)
    return g / WORLD



@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(_proc.free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- references

def _single_nce():
    x, y, wi, wt = _tensor_problem()
    pi, pt, ls = _params(wi, wt)
    loss = L.info_nce(F.normalize(x @ pi, dim=-1), F.normalize(y @ pt, dim=-1), ls.exp())
    loss.backward()
    return loss.detach(), [pi.grad, pt.grad, ls.grad]


def test_info_nce_matches_single_process(dist_results):
    loss, grads = _single_nce()
    for r in range(WORLD):
        dloss, dgrads = dist_results[r]["nce_correct"]
        torch.testing.assert_close(dloss, loss, **TOL)  # reported value = global loss on every rank
        for g, dg in zip(grads, dgrads):
            torch.testing.assert_close(dg, g, **TOL)


def test_wrong_gathers_differ(dist_results):
    """A no-grad gather (local slice put back) and local-rows-only are measurably wrong."""
    _, grads = _single_nce()
    for kind in ("slice", "rows"):
        _, dgrads = dist_results[0][f"nce_{kind}"]
        diff = max(float((g - dg).abs().max()) for g, dg in zip(grads[:2], dgrads[:2]))
        assert diff > 1e-4, kind
    # the 'slice' variant loses exactly the other ranks' column terms: not a pure 1/W scale
    # of the row terms, and differs from the 'rows' variant too
    s, rw = dist_results[0]["nce_slice"][1], dist_results[0]["nce_rows"][1]
    assert float((s[0] - rw[0]).abs().max()) > 1e-6


def test_triplet_matches_single_process(dist_results):
    x, y, wi, wt = _tensor_problem()
    pi, pt, _ = _params(wi, wt)
    loss = L.triplet_loss(F.normalize(x @ pi, dim=-1), F.normalize(y @ pt, dim=-1), margin=0.3,
                          image_ids=torch.arange(WORLD * B) // 2)
    loss.backward()
    for r in range(WORLD):
        dloss, (gi, gt) = dist_results[r]["triplet"]
        torch.testing.assert_close(dloss, loss.detach(), **TOL)
        torch.testing.assert_close(gi, pi.grad, **TOL)
        torch.testing.assert_close(gt, pt.grad, **TOL)


@pytest.mark.parametrize("exchange", ["all_to_all", "all_gather"])
def test_model_itc_itm_matches_single_process(dist_results, exchange):
    model = _model(1.0, exchange)
    px, ids, mask, image_ids = _model_batch(WORLD * B)
    out = model(px, ids, mask, image_ids)
    out["loss"].backward()
    for r in range(WORLD):
        dout, dgrads = dist_results[r][f"model_{exchange}"]
        for k in ("loss", "loss_itc", "loss_itm", "itm_acc", "logit_scale"):
            torch.testing.assert_close(dout[k], out[k].detach(), **TOL)
        for n, p in model.named_parameters():
            torch.testing.assert_close(dgrads[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_feature_cache_matches_full_accumulated_batch(dist_results):
    model = _model(0.0)
    px, ids, mask, image_ids = _model_batch(WORLD * 4)
    out = model(px, ids, mask, image_ids)
    out["loss"].backward()
    values, dgrads = dist_results[0]["cache"]
    for v in values:
        torch.testing.assert_close(v, out["loss_itc"].detach(), **TOL)
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)  # ITM head unused (itm_weight 0)
        torch.testing.assert_close(dgrads[n], g, rtol=1e-8, atol=1e-10, msg=n)


def test_feature_cache_without_gather_uses_the_local_block(dist_results):
    for r in range(WORLD):
        values, full = dist_results[r]["cache_nogather"]
        torch.testing.assert_close(values, full.expand_as(values), **TOL)


def test_fetch_rows_all_to_all(dist_results):
    full = torch.cat([torch.arange(B * 4, dtype=torch.float64).view(B, 4) + 100 * r for r in range(WORLD)])
    for r, req in ((0, [3, 4, 5]), (1, [5, 0, 2])):
        a2a, ag = dist_results[r]["fetch"]
        torch.testing.assert_close(a2a, full[req])
        torch.testing.assert_close(ag, full[req])
