"""WordPiece tokenizer trained from captions, saved/loaded offline; 'auto' beside the shards."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from _shardutil import caption_for, write_test_shards
from mmpretrain.data.tokenizer import load_tokenizer, tokenize, train_tokenizer

CAPTIONS = [caption_for(i) for i in range(64)] + ["A RED Circle, left of a Blue square!"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    tok = train_tokenizer(CAPTIONS, d, 150)
    return d, tok


def test_special_tokens_and_offline_reload(saved):
    d, tok = saved
    assert [tok.convert_tokens_to_ids(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [0, 1, 2, 3, 4]
    assert tok.pad_token_id == 0
    re = AutoTokenizer.from_pretrained(d)
    assert len(re) == len(tok) <= 150
    ids = re("A Red circle")["input_ids"]
    assert ids[0] == re.cls_token_id and ids[-1] == re.sep_token_id
    assert ids == tok("a red CIRCLE")["input_ids"]  # lower-casing normalizer
    assert re.convert_ids_to_tokens(ids)[1:-1] == ["a", "red", "circle"]
    assert "," in re.tokenize("red, blue")  # punctuation split off


def test_tokenize_pads_and_truncates(saved):
    _, tok = saved
    out = tokenize(tok, ["a red circle", CAPTIONS[-1] * 5], 8)
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].shape == (2, 8) == out["attention_mask"].shape
    ids0 = tok("a red circle")["input_ids"]
    assert out["input_ids"][0, :len(ids0)].tolist() == ids0
    assert out["input_ids"][0, len(ids0):].eq(0).all() and out["attention_mask"][0].sum() == len(ids0)
    assert out["attention_mask"][1].all() and out["input_ids"][1, -1] == tok.sep_token_id
    ref = tok(["a red circle", CAPTIONS[-1] * 5], padding="max_length", truncation=True, max_length=8)
    assert out["input_ids"].tolist() == ref["input_ids"]  # fast path == transformers call


def test_load_auto_trains_beside_shards_then_reuses(tmp_path):
    write_test_shards(str(tmp_path), 2, 6)
    pattern = str(tmp_path / "train-*.tar")
    tok = load_tokenizer("auto", [pattern], 120)
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer_config.json")
    mtime = os.path.getmtime(tmp_path / "tokenizer" / "tokenizer_config.json")
    again = load_tokenizer("auto", [pattern], 120)
    assert os.path.getmtime(tmp_path / "tokenizer" / "tokenizer_config.json") == mtime
    assert again("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"])[1:-1] == ["a", "red", "circle"]
    local = load_tokenizer(str(tmp_path / "tokenizer"), None, 0)
    assert local.get_vocab() == tok.get_vocab()


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing" / "tok"), None, 100)
    with pytest.raises(ValueError, match="no captions|none match"):
        load_tokenizer("auto", [str(tmp_path / "nothing-*.tar")], 100)


def _ref_ids(tok, captions, max_length):
    ref = tok(list(captions), padding="max_length", truncation=True, max_length=max_length)
    return ref["input_ids"], ref["attention_mask"]


EDGE_CAPTIONS = [
    "a red circle", "A RED Circle, left of a Blue square!", "", " ", "\x00", "\t\n\r", "\x01\x1f\x7f",
    "x", "!", "...", "a\tb\nc\rd\x0be\x0cf", "a  b   c", "word" * 60, "[PAD]", "a [CLS] b [SEP]",
    "[pad] [Mask] [UNK", "Über café naïve", "中文字 mixed ASCII", "zero\u200bwidth", "\ufffd\ufeffx",
    "a\u00a0b", "ÉCOLE", "left, right; up: down (x) [y] {z} 'q' \"w\" a-b a_b a/b",
    " ".join(caption_for(i) for i in range(12)),  # far longer than max_length
] + [caption_for(i) for i in range(40)] + [f"a{chr(c)}B{chr(c)}" for c in range(128)]


@pytest.mark.parametrize("max_length", [2, 3, 8, 32])
def test_fast_tokenization_equals_transformers(saved, max_length):
    """The loader's path (Rust backend, ASCII shortcut, numpy arrays) gives exactly the ids and
    masks of the transformers call: long, empty-ish, special-token, non-ASCII captions and every
    ASCII character, in mixed and uniform batches."""
    from mmpretrain.data.tokenizer import _fast_backend, tokenize_np

    _, tok = saved
    fast = _fast_backend(tok, max_length)
    assert fast is not None and fast.plain is not None  # the BertNormalizer shortcut is active
    assert (fast._words is not None) == (max_length >= 2)  # and the word-level one
    rng = random.Random(max_length)
    pieces = [chr(c) for c in range(128) if chr(c) != "["] + ["red ", "Circle", " left of ", "x" * 120, "##", "]"]
    ascii_random = ["".join(rng.choice(pieces) for _ in range(rng.choice([0, 1, 3, 10, 40, 150]))) for _ in range(300)]
    ascii_edge = [c for c in EDGE_CAPTIONS if c.isascii() and "[" not in c]
    for batch in (EDGE_CAPTIONS, ascii_edge, ascii_random, ["Über", "ça"], []):
        ids, mask = tokenize_np(tok, batch, max_length)
        assert ids.dtype == np.int64 and mask.dtype == np.int64
        assert ids.shape == mask.shape == (len(batch), max_length)
        if batch:
            ref_ids, ref_mask = _ref_ids(tok, batch, max_length)
            assert ids.tolist() == ref_ids
            assert mask.tolist() == ref_mask
    out = tokenize(tok, EDGE_CAPTIONS, max_length)  # the torch wrapper: same numbers
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].tolist() == _ref_ids(tok, EDGE_CAPTIONS, max_length)[0]


def test_fast_tokenization_other_normalizer_settings(saved):
    """The ASCII shortcut follows BertNormalizer's flags (no lower-casing, no text cleaning)."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from mmpretrain.data.tokenizer import tokenize_np

    d, _ = saved
    for flags in (dict(lowercase=False), dict(clean_text=False), dict(clean_text=False, lowercase=False)):
        backend = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        backend.normalizer = normalizers.BertNormalizer(**flags)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
        ids, mask = tokenize_np(tok, EDGE_CAPTIONS, 16)
        ref_ids, ref_mask = _ref_ids(tok, EDGE_CAPTIONS, 16)
        assert ids.tolist() == ref_ids and mask.tolist() == ref_mask, flags
