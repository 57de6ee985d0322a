"""MLM, the ITM hardness curriculum, ITM on a share of the batch and the token-level
contrastive term: 2 real gloo processes equal one process holding the global batch (float64),
for the loss values and every gradient.

The share cases choose an uneven number of rows per rank (one rank may score none), which is
where a per-rank mean would be wrong: the loss must be the mean over the chosen items of all
ranks.
"""

from __future__ import annotations

import os

import pytest
import torch

import _proc
from mmpretrain.models import LossConfig, ModelConfig, build_model

pytestmark = pytest.mark.distributed

WORLD, B, NTOK = 2, 4, 8
# swap group 0: classes {5, 6}, {7}, {8}; replace group 1: {9}, {10}, {11}; flip group 2: {12} <-> {13}
WORD_TABLE = ([[0, 0, 0, 5, 0], [0, 0, 0, 6, 0], [0, 0, 1, 7, 0], [0, 0, 2, 8, 1]]
              + [[1, 1, c, 9 + c, 0] for c in range(3)] + [[2, 2, 0, 12, 0], [2, 2, 1, 13, 0]])
CASES = {
    # name: loss config overrides
    "mlm": dict(itm_weight=0.0, mlm_weight=1.0, mlm_prob=0.4),
    "mlm_itm_curriculum": dict(itm_weight=1.0, mlm_weight=0.5, mlm_prob=0.4, itm_curriculum_steps=3,
                               itm_random_mix=0.25),
    "itm_half": dict(itm_weight=1.0, itm_fraction=0.5),
    "itm_one_row": dict(itm_weight=1.0, itm_fraction=0.1, mlm_weight=1.0, mlm_prob=0.4),
    # fusion over the unimodal outputs: negatives fetched from the other rank take their
    # unimodal pass there, and the ITM/MLM gradients reach the shared stack through them
    "towers_mlm_itm": dict(itm_weight=1.0, itm_fraction=0.5, mlm_weight=0.5, mlm_prob=0.4,
                           _model=dict(fusion_source="towers", fusion_depth=2)),
    # word-changed text negatives: the rows' random numbers are drawn for the global batch, so
    # each rank changes its rows as the single process does (tokens 5..12 form the word sets)
    "towers_word_negatives": dict(itm_weight=1.0, itm_fraction=0.75, itm_word_negatives=0.6,
                                  word_negative_table=WORD_TABLE, mlm_weight=0.5, mlm_prob=0.2, mlm_word_prob=0.7,
                                  _model=dict(fusion_source="towers", fusion_depth=2)),
    # contrastive word negatives only (no fused pass): the extra column of each image row
    "itc_word_negatives": dict(itm_weight=0.0, itc_word_negatives=0.7, word_negative_table=WORD_TABLE),
    # the token-level (FILIP) contrastive term: every rank's tokens gathered with gradient
    "itc_token": dict(itm_weight=0.0, itc_token_weight=0.8),
    "towers_itc_token_itm": dict(itm_weight=1.0, itm_fraction=0.5, itc_token_weight=0.5,
                                 _model=dict(fusion_source="towers", fusion_depth=1, image_pool="max",
                                             itm_head="match", fusion_gates=True)),
    # the ITM contrastive prior: its running centre comes from global sums and counts
    "towers_prior": dict(itm_weight=1.0, itm_fraction=0.6, itm_word_negatives=0.5, word_negative_table=WORD_TABLE,
                         _model=dict(fusion_source="towers", fusion_depth=1, itm_contrastive_prior=True)),
    # the match head (pooled, projected fused towers; image max-pool): no collective of its own
    "towers_match_head": dict(itm_weight=1.0, itm_fraction=0.5, mlm_weight=0.5, mlm_prob=0.4,
                              _model=dict(fusion_source="towers", fusion_depth=1, image_pool="max", itm_head="match")),
    # with zero-initialised fusion gates the MLM head reads fusion_norm of the residual stream
    "towers_match_gates": dict(itm_weight=1.0, itm_fraction=0.75, mlm_weight=0.5, mlm_prob=0.4, itm_rank_weight=0.7,
                               _model=dict(fusion_source="towers", fusion_depth=2, itm_head="match",
                                           fusion_gates=True)),
    # the late-interaction head (every fused token projected, best image token per text token)
    "towers_late_words": dict(itm_weight=1.0, itm_fraction=0.75, itm_word_negatives=0.5, word_negative_table=WORD_TABLE,
                              itm_rank_weight=0.5,
                              _model=dict(fusion_source="towers", fusion_depth=2, image_pool="max", itm_head="late",
                                          fusion_gates=True)),
}
STEPS = 2  # the second forward uses the advanced counter (curriculum, masks, negatives)
KEYS = ("loss", "loss_itc", "loss_itm", "itm_acc", "loss_itm_rank", "itm_rank_acc", "loss_mlm", "mlm_acc", "itm_word_share", "itm_prior_slope",
        "itc_word_share", "loss_itc_token")


def _model(overrides):
    torch.manual_seed(1)
    overrides = dict(overrides)
    mc = ModelConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, embed_dim=8,
                     max_text_length=NTOK, **overrides.pop("_model", {}))
    lc = LossConfig(itm_seed=3, mlm_mask_token_id=4, **overrides)
    return build_model(mc, lc, vocab_size=30).double().train()


def _batch(n, step):
    g = torch.Generator().manual_seed(5 + step)
    px = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(5, 30, (n, NTOK), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(n, NTOK, dtype=torch.long)
    mask[::2, 6:] = 0
    image_ids = torch.arange(n) // 2
    return px, ids, mask, image_ids


def _run(model, rows, world):
    """STEPS forwards + backwards (gradients summed), returns the outputs and the gradients."""
    outs = []
    for step in range(STEPS):
        px, ids, mask, image_ids = _batch(WORLD * B, step)
        out = model(px[rows], ids[rows], mask[rows], image_ids[rows])
        out["loss"].backward()
        outs.append({k: out[k].detach() for k in KEYS if k in out})
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if world > 1:
            torch.distributed.all_reduce(g)
            g = g / world
        grads[n] = g
    return outs, grads


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    res = {name: _run(_model(ov), slice(rank * B, (rank + 1) * B), WORLD) for name, ov in CASES.items()}
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_mlm")
    torch.multiprocessing.spawn(_worker, args=(_proc.free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(dist_results, name):
    outs, grads = _run(_model(CASES[name]), slice(0, WORLD * B), 1)
    for step in range(STEPS):
        assert set(outs[step]) >= {"loss", "loss_itc"}
        if CASES[name].get("mlm_weight"):
            assert "loss_mlm" in outs[step]
        if CASES[name].get("itc_token_weight"):
            assert "loss_itc_token" in outs[step]
    for r in range(WORLD):
        douts, dgrads = dist_results[r][name]
        for step in range(STEPS):
            assert set(douts[step]) == set(outs[step])
            for k, v in outs[step].items():
                torch.testing.assert_close(douts[step][k], v, rtol=1e-9, atol=1e-11, msg=f"{name} step {step} {k}")
        for n, g in grads.items():
            torch.testing.assert_close(dgrads[n], g, rtol=1e-8, atol=1e-10, msg=f"{name} {n}")


def test_share_cases_split_rows_unevenly(dist_results):
    """Guard that the share cases exercise uneven splits (else a per-rank mean would pass)."""
    from mmpretrain import losses as L

    h = torch.tensor([5.0, 4.0, 3.0, 2.5, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)  # rank 0 holds the top
    mask = L.select_hardest(h, 0.5, gather=False)
    assert mask.tolist() == [True] * 4 + [False] * 4
