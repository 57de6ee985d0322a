"""Word-changed ITM negatives (mmpretrain.word_negatives): each kind changes exactly the intended
words, articles agree, unchangeable captions are left alone, the choice of a row does not
depend on how the global batch is split over ranks, and the model scores them as ITM negatives."""

from __future__ import annotations

import pytest
import torch

from mmpretrain import word_negatives as W
from mmpretrain.data import synthetic as S
from mmpretrain.data.tokenizer import tokenize, train_tokenizer

CAPTIONS = [
    "an orange circle left of a red square on a plain black background.",
    "a blue circle and a red circle on a striped navy background.",
    "a small green star above a large pink ring, plus a cyan hexagon in the top left.",
    "a plain black background.",
    "a big white disc in the bottom-right corner of a checked beige background.",
]


@pytest.fixture(scope="module")
def tok():
    rng = __import__("random").Random(0)
    caps = [S.make_caption(S.sample_scene(rng, 64), rng) for _ in range(400)] + CAPTIONS
    return train_tokenizer(caps, None, 600)


@pytest.fixture(scope="module")
def table(tok):
    return W.build_table(W.load_word_sets("synthetic"), tok)


def _change(tok, table, captions, kinds=None, seed=0):
    t = tokenize(tok, captions, 32)
    ids, chosen = W.word_negatives(t["input_ids"], t["attention_mask"], table, 1.0, torch.Generator().manual_seed(seed))
    return [tok.decode(r, skip_special_tokens=True) for r in ids], chosen.tolist(), t


def _words(s):
    return s.replace(",", " ,").replace(".", " .").split()


def test_every_change_differs_in_the_intended_words_only(tok, table):
    swap_words = {w for _, ws in S.COLORS.values() for w in ws} | {w for _, ws in S.SIZES.values() for w in ws}
    shape_words = {w for ws in S.SHAPES.values() for w in ws}
    flip_words = {"left", "right", "above", "over", "below", "under", "beneath", "top", "bottom"}
    seen = set()
    for seed in range(40):
        out, chosen, _ = _change(tok, table, CAPTIONS, seed=seed)
        assert chosen == [True, True, True, False, True]  # a background-only caption has nothing to change
        for cap, new, ok in zip(CAPTIONS, out, chosen):
            if not ok:
                assert new == tok.decode(tok(cap)["input_ids"], skip_special_tokens=True)
                continue
            a, b = _words(tok.decode(tok(cap)["input_ids"], skip_special_tokens=True)), _words(new)
            assert len(a) == len(b)
            diff = [(x, y) for x, y in zip(a, b) if x != y and {x, y} != {"a", "an"}]
            assert len(diff) in (1, 2), (cap, new)
            if len(diff) == 2:  # a swap: the two words exchanged places
                assert diff[0] == diff[1][::-1] and diff[0][0] in swap_words
                seen.add("swap")
            elif diff[0][0] in shape_words:
                assert diff[0][1] in shape_words
                seen.add("replace")
            else:
                assert diff[0][0] in flip_words and diff[0][1] in flip_words
                seen.add("flip")
            for i in range(len(b) - 1):  # articles agree with the word after them
                if b[i] in ("a", "an") and b[i + 1] in swap_words | shape_words:
                    assert b[i] == ("an" if b[i + 1][0] in "aeiou" else "a"), new
    assert seen == {"swap", "replace", "flip"}


def test_same_meaning_swaps_and_present_shapes_are_not_used(tok, table):
    # "a blue circle and a red circle": a colour swap says the same, so only a shape
    # replacement applies; the replacing shape is one the caption does not name
    for seed in range(30):
        out, chosen, _ = _change(tok, table, [CAPTIONS[1]], seed=seed)
        assert chosen == [True]
        words = _words(out[0])
        assert "blue" in words and "red" in words and words.index("blue") < words.index("red")
        assert "circle" in words and sum(w in {"square", "box", "star", "triangle", "diamond", "rhombus", "cross",
                                                 "ring", "hoop", "hexagon"} for w in words) == 1


def test_share_and_global_rows_do_not_depend_on_the_split(tok, table):
    caps = CAPTIONS * 4
    t = tokenize(tok, caps, 32)
    full, full_rows = W.word_negatives(t["input_ids"], t["attention_mask"], table, 0.5, torch.Generator().manual_seed(7))
    assert 0 < int(full_rows.sum()) < len(caps)
    parts = [W.word_negatives(t["input_ids"][o:o + 5], t["attention_mask"][o:o + 5], table, 0.5,
                              torch.Generator().manual_seed(7), row_offset=o, n_rows=len(caps)) for o in range(0, 20, 5)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_rows)
    assert torch.equal(full[~full_rows], t["input_ids"][~full_rows])
    none, rows = W.word_negatives(t["input_ids"], t["attention_mask"], table, 0.0, torch.Generator().manual_seed(7))
    assert not rows.any() and torch.equal(none, t["input_ids"])


def test_word_set_files_are_checked(tmp_path, tok):
    good = tmp_path / "words.yaml"
    good.write_text("swap:\n  colour: [[red, crimson], [blue]]\nflip:\n  lr: [[left], [right]]\n")
    rows = W.build_table(W.load_word_sets(str(good)), tok)
    assert {r[0] for r in rows} == {W.SWAP, W.FLIP, W.ARTICLE}
    bad = tmp_path / "bad.yaml"
    bad.write_text("flip:\n  lr: [[left], [right], [up]]\n")
    with pytest.raises(W.WordNegativeError, match=r"bad.yaml: flip.lr must be a list of exactly 2"):
        W.load_word_sets(str(bad))
    with pytest.raises(W.WordNegativeError, match="loss.word_negative_words"):
        W.load_word_sets(str(tmp_path / "missing.yaml"))
    dup = tmp_path / "dup.yaml"
    dup.write_text("swap:\n  a: [[red], [blue]]\nreplace:\n  b: [[red], [green]]\n")
    with pytest.raises(W.WordNegativeError, match="'red'"):
        W.build_table(W.load_word_sets(str(dup)), tok)


def test_model_scores_the_changed_caption_as_the_text_negative(tok, table):
    from mmpretrain.models import LossConfig, ModelConfig, build_model

    torch.manual_seed(0)
    mc = ModelConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, embed_dim=8, max_text_length=32,
                     fusion_source="towers", fusion_depth=1)
    lc = LossConfig(itm_weight=1.0, itm_word_negatives=1.0, word_negative_table=table)
    model = build_model(mc, lc, len(tok)).train()
    t = tokenize(tok, CAPTIONS, 32)
    seen = []
    orig = model.backbone.text_inputs
    model.backbone.text_inputs = lambda ids, mask: (seen.append(ids.clone()), orig(ids, mask))[1]
    out = model(torch.randn(5, 3, 16, 16), t["input_ids"], t["attention_mask"])
    expected, rows = W.word_negatives(t["input_ids"], t["attention_mask"], table, 1.0, model._generator(0, 2))
    assert torch.equal(seen[1][rows], expected[rows]) and rows.tolist() == [True, True, True, False, True]
    assert float(out["itm_word_share"]) == pytest.approx(0.8)
    assert torch.isfinite(out["loss"])
    empty = build_model(mc, LossConfig(itm_weight=1.0, itm_word_negatives=0.5), len(tok)).train()
    with pytest.raises(ValueError, match="word_negative_table is empty"):
        empty(torch.randn(5, 3, 16, 16), t["input_ids"], t["attention_mask"])


def test_itc_word_negatives_add_one_own_column_to_the_image_rows():
    from mmpretrain import losses as L

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    base = L.info_nce(img, txt, 10.0, gather=False)
    none = L.info_nce(img, txt, 10.0, gather=False, extra_i2t=torch.full((6,), float("-inf")))
    torch.testing.assert_close(none, base)
    extra = (img * neg).sum(-1).masked_fill(torch.tensor([True, False] * 3), float("-inf"))
    scale = torch.tensor(10.0, requires_grad=True)
    loss = L.info_nce(img, txt, scale, gather=False, extra_i2t=extra)
    logits = 10.0 * img @ txt.t()
    want_i2t = torch.stack([torch.logsumexp(torch.cat([logits[i], (10.0 * extra[i]).reshape(1)]), 0) - logits[i, i]
                            for i in range(6)]).mean()
    want_t2i = torch.nn.functional.cross_entropy(logits.t(), torch.arange(6))
    torch.testing.assert_close(loss, 0.5 * (want_i2t + want_t2i))
    loss.backward()
    assert neg.grad[1::2].abs().sum() > 0 and neg.grad[0::2].abs().sum() == 0
    assert torch.isfinite(scale.grad)  # a row without an extra column adds no 0 * inf
    cache = L.FeatureCache.from_local([img], [txt], gather=False)
    with pytest.raises(ValueError, match="feature cache"):
        L.info_nce(img, txt, 10.0, gather=False, cache=cache.at(0, 6), extra_i2t=extra.detach())
