"""MLM masking, the ITM hardness curriculum, ITM on a share of the batch, the ITM read-out and
the caption-preserving training crop (single process; the 2-process equality is in
tests/distributed/test_mlm_distributed.py)."""

from __future__ import annotations

import random

import pytest
import torch

from mmpretrain import losses as L
from mmpretrain.data import transforms as T
from mmpretrain.data.config import DataConfig
from mmpretrain.models import LossConfig, ModelConfig, build_model


def _ids(n=64, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(n, length, dtype=torch.long)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    for i, k in enumerate(lengths.tolist()):
        ids[i, k - 1] = 3  # [SEP]
        ids[i, k:] = 0
        mask[i, k:] = 0
    return ids, mask


def test_mlm_mask_never_touches_cls_sep_or_padding_and_follows_bert_rates():
    ids, mask = _ids(n=400, length=16)
    masked, labels = L.mlm_mask(ids, mask, torch.Generator().manual_seed(1), 0.3, 4, 50)
    chosen = labels != -100
    lengths = mask.sum(1)
    pos = torch.arange(16).unsqueeze(0)
    assert not chosen[:, 0].any()
    assert not (chosen & (pos >= (lengths - 1).unsqueeze(1))).any()  # [SEP] and padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    candidates = int(((pos > 0) & (pos < (lengths - 1).unsqueeze(1))).sum())
    share = chosen.sum().item() / candidates
    assert 0.25 < share < 0.35  # 0.3 of ~4,000 candidates: 5 sigma is 0.036
    as_mask = (masked[chosen] == 4).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.74 < as_mask < 0.86 and 0.05 < unchanged < 0.16


def test_mlm_mask_of_a_slice_equals_the_global_draw():
    ids, mask = _ids(n=8)
    full_ids, full_labels = L.mlm_mask(ids, mask, torch.Generator().manual_seed(7), 0.5, 4, 50, 0, 8)
    part_ids, part_labels = L.mlm_mask(ids[4:], mask[4:], torch.Generator().manual_seed(7), 0.5, 4, 50, 4, 8)
    assert torch.equal(part_ids, full_ids[4:]) and torch.equal(part_labels, full_labels[4:])


def test_curriculum_share_falls_linearly_to_the_final_mix():
    assert L.itm_uniform_share(0, 100, 0.2) == 1.0
    assert L.itm_uniform_share(50, 100, 0.2) == pytest.approx(0.6)
    assert L.itm_uniform_share(100, 100, 0.2) == pytest.approx(0.2)
    assert L.itm_uniform_share(10_000, 100, 0.2) == pytest.approx(0.2)
    assert L.itm_uniform_share(5, 0, 0.3) == pytest.approx(0.3)


def test_uniform_share_one_ignores_the_similarity():
    n = 8
    sim = torch.zeros(n, n, dtype=torch.float64)
    sim[:, 1] = 50.0  # column 1 is by far the "hardest" for every row
    ids = torch.arange(n)
    hard = [L.sample_itm_negatives(sim, sim, ids, ids, torch.Generator().manual_seed(s)).text_idx
            for s in range(200)]
    uni = [L.sample_itm_negatives(sim, sim, ids, ids, torch.Generator().manual_seed(s), uniform_mix=1.0).text_idx
           for s in range(200)]
    rows = torch.arange(n) != 1
    hard_share = torch.stack(hard)[:, rows].eq(1).float().mean().item()
    uni_share = torch.stack(uni)[:, rows].eq(1).float().mean().item()
    assert hard_share > 0.99
    assert abs(uni_share - 1 / (n - 1)) < 0.05  # uniform over the 7 valid columns
    for idx in uni:  # never the positive (same image id)
        assert not torch.equal(idx, torch.arange(n)) and (idx != torch.arange(n)).all()


def test_select_hardest_takes_the_global_top_share_with_stable_ties():
    h = torch.tensor([0.1, 3.0, 2.0, 2.0, -1.0, 5.0], dtype=torch.float64)
    m = L.select_hardest(h, 0.5, gather=False)
    assert m.tolist() == [False, True, True, False, False, True]  # top 3: 5.0, 3.0, then the first 2.0
    assert L.select_hardest(h, 1.0, gather=False).all()
    assert L.select_hardest(h, 0.01, gather=False).sum() == 1


def test_global_item_mean_without_process_group_is_the_mean():
    s = torch.tensor(6.0)
    assert float(L.global_item_mean(s, 3)) == pytest.approx(2.0)
    assert float(L.global_item_mean(torch.tensor(0.0), 0)) == 0.0  # no items: 0, not NaN


def _tiny(**loss):
    torch.manual_seed(0)
    mc = ModelConfig(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, embed_dim=8, max_text_length=12)
    return build_model(mc, LossConfig(mlm_mask_token_id=4, **loss), vocab_size=50)


def test_model_reports_mlm_and_itm_on_a_share_and_trains_every_head():
    model = _tiny(mlm_weight=1.0, mlm_prob=0.4, itm_fraction=0.5, itm_curriculum_steps=10).train()
    ids, mask = _ids(n=8)
    px = torch.randn(8, 3, 16, 16)
    out = model(px, ids, mask, torch.arange(8))
    for k in ("loss_itc", "loss_itm", "itm_acc", "loss_mlm", "mlm_acc", "itm_uniform_share"):
        assert k in out and torch.isfinite(out[k]), k
    assert float(out["itm_uniform_share"]) == 1.0  # first forward: all random negatives
    out["loss"].backward()
    for name in ("backbone.mlm_head.decoder.weight", "backbone.itm_head.fc.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert int(model.itm_step) == 1


def test_no_mlm_head_without_mlm_and_mlm_needs_the_unified_model():
    assert _tiny().backbone.mlm_head is None
    with pytest.raises(ValueError, match="mlm_weight"):
        build_model(ModelConfig(arch="dual_encoder", width=16, depth=1, num_heads=2, image_size=16),
                    LossConfig(mlm_weight=1.0), vocab_size=50)
    with pytest.raises(ValueError, match="itm_fraction"):
        _tiny(itm_fraction=0.0)


def test_itm_readout_is_the_text_cls_by_default():
    model = _tiny().eval()
    bb = model.backbone
    ids, mask = _ids(n=2)
    px = torch.randn(2, 3, 16, 16)
    xi, xt = bb.image_inputs(px), bb.text_inputs(ids, mask)
    tokens = bb.fuse_tokens(xi, xt, mask)
    torch.testing.assert_close(bb.fuse(xi, xt, mask), tokens[:, xi.shape[1]])
    bb.cfg.itm_readout = "image_cls"
    torch.testing.assert_close(bb.fuse(xi, xt, mask), tokens[:, 0])


def test_default_train_crop_keeps_at_least_90_percent_of_the_image():
    assert tuple(DataConfig().train_crop_scale) == T.DEFAULT_CROP_SCALE == (0.9, 1.0)
    for seed in range(200):
        x0, y0, x1, y1 = T.crop_box(64, 64, True, "random_resized", seed)
        assert (x1 - x0) * (y1 - y0) >= 0.9 * 64 * 64 * 0.97  # integer rounding of the sides
    # the old torchvision range does cut small crops: the setting is what changed it
    small = min((b[2] - b[0]) * (b[3] - b[1]) for b in
                (T.random_resized_box(64, 64, random.Random(s), scale=(0.08, 1.0)) for s in range(200)))
    assert small < 0.3 * 64 * 64
    with pytest.raises(ValueError, match="train_crop_scale"):
        DataConfig(train_crop_scale=[0.5, 1.5])


def test_mlm_word_prob_chooses_the_word_set_tokens_at_their_own_rate():
    from mmpretrain import losses as L

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (400, 16), generator=g)
    mask = torch.ones_like(ids)
    focus = list(range(5, 10))
    _, labels = L.mlm_mask(ids, mask, torch.Generator().manual_seed(1), 0.1, 3, 50, focus_ids=focus, focus_prob=0.9)
    inner = torch.zeros_like(ids, dtype=torch.bool)
    inner[:, 1:-1] = True
    is_focus = torch.isin(ids, torch.tensor(focus)) & inner
    other = ~torch.isin(ids, torch.tensor(focus)) & inner
    chosen = labels != -100
    assert 0.85 < chosen[is_focus].float().mean() < 0.95
    assert 0.07 < chosen[other].float().mean() < 0.13
    same, _ = L.mlm_mask(ids, mask, torch.Generator().manual_seed(1), 0.1, 3, 50)
    plain, _ = L.mlm_mask(ids, mask, torch.Generator().manual_seed(1), 0.1, 3, 50, focus_ids=focus, focus_prob=0.0)
    assert torch.equal(same, plain)  # 0: every token at mlm_prob, as before


def test_the_seeded_streams_draw_different_numbers():
    """ITM negatives, MLM masks and the two word-negative draws must not share uniforms (torch's
    CPU generator keeps only the low 32 bits of a seed: streams 2**40 apart collided)."""
    model = build_model(ModelConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, embed_dim=8),
                        LossConfig(itm_seed=3), vocab_size=30)
    for step in (0, 7):
        draws = [tuple(torch.rand(4, generator=model._generator(step, s)).tolist()) for s in range(4)]
        assert len(set(draws)) == 4
    first = torch.rand(4, generator=model._generator(5, 0))
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5)))
