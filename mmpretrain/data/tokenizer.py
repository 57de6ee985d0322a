"""Caption tokenizer: a WordPiece vocabulary trained from the shard captions, offline.

``train_tokenizer`` builds a BERT-style WordPiece tokenizer with the ``tokenizers`` library
(BERT normalizer with lower-casing, BERT whitespace/punctuation pre-tokenizer, special tokens
``[PAD]=0 [UNK] [CLS] [SEP] [MASK]``, ``[CLS] ... [SEP]`` post-processor) and saves it with
``save_pretrained`` so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it without a
network.

``load_tokenizer(spec, shard_sources, vocab_size)`` resolves ``data.tokenizer``:

* ``"auto"``: ``tokenizer/`` beside the first shard (the shard directory); when missing, one is
  trained from the captions of ``shard_sources`` and saved there (written to a temporary
  directory and renamed, so several ranks racing on it end up loading the same files);
* a local directory holding a saved tokenizer;
* anything else: a hub name passed to ``AutoTokenizer.from_pretrained`` (needs a network or a
  populated cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_DIRNAME = "tokenizer"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers are forked


def train_tokenizer(captions: list[str], out_dir: str | None, vocab_size: int):
    """Train a WordPiece tokenizer on ``captions``; save it to ``out_dir`` (when given)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), special_tokens=SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(list(captions), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True, model_max_length=512,
    )
    assert fast.pad_token_id == 0, "the [PAD] token must have id 0"
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _shard_dir(first_source: str) -> Path | None:
    """Local directory holding the first shard, or None for remote/pipe sources."""
    if first_source.startswith("pipe:") or "://" in first_source and not first_source.startswith("file://"):
        return None
    path = first_source[len("file://"):] if first_source.startswith("file://") else first_source
    return Path(path).parent


def read_captions(urls: list[str]) -> list[str]:
    """Every non-empty caption of the shards (raw read, no image decoding)."""
    from mmpretrain.data.loader import iter_shard_samples

    captions = []
    for url in urls:
        for _idx, sample in iter_shard_samples(url):
            txt = sample.get("txt")
            if not txt:
                continue
            try:
                text = txt.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text:
                captions.append(text)
    return captions


def load_tokenizer(spec: str, shard_sources: list[str] | str | None, vocab_size: int = 4096, *,
                   save: bool = True):
    """Resolve ``data.tokenizer`` (see module docstring). ``save=False`` trains in memory only."""
    from transformers import AutoTokenizer

    if spec != "auto":
        if os.path.isdir(spec):
            return AutoTokenizer.from_pretrained(spec)
        try:
            return AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001 - rephrase for the offline default
            raise ValueError(
                f"data.tokenizer={spec!r} is neither a local tokenizer directory nor a hub name "
                f"that could be loaded ({type(e).__name__}: {e}); use 'auto' to train one from "
                "the shard captions") from None

    from mmpretrain.data.loader import expand_sources

    urls = expand_sources(shard_sources or [])
    if not urls:
        raise ValueError(f"data.tokenizer='auto' needs shards to train from; none match {shard_sources!r}")
    shard_dir = _shard_dir(urls[0])
    if shard_dir is None:  # remote shards: cache keyed by the source list
        digest = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]
        shard_dir = Path(os.environ.get("MMPRETRAIN_CACHE", Path.home() / ".cache" / "mmpretrain")) / digest
    target = shard_dir / TOKENIZER_DIRNAME
    if (target / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(target))
    captions = read_captions(urls)
    if not captions:
        raise ValueError(f"data.tokenizer='auto': the shards {urls[:3]}... hold no captions to train on")
    if not save:
        return train_tokenizer(captions, None, vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=str(target.parent)))
    try:
        train_tokenizer(captions, str(tmp), vocab_size)
        try:
            os.rename(tmp, target)  # atomic; fails when another process won the race
        except OSError:
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(target))


_BACKENDS: dict[tuple[int, int], Any] = {}


def _fast_backend(tokenizer, max_length: int):
    """A copy of the tokenizer's Rust backend set to pad/truncate to ``max_length`` (the same
    ids as ``tokenizer(..., padding="max_length", truncation=True)`` without the Python
    overhead of ``transformers``), or None when the tokenizer has no such backend."""
    key = (id(tokenizer), max_length)
    if key not in _BACKENDS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.pad_token_id is None or getattr(tokenizer, "padding_side", "right") != "right" \
                or getattr(tokenizer, "truncation_side", "right") != "right":
            _BACKENDS[key] = None
        else:
            from tokenizers import Tokenizer

            b = Tokenizer.from_str(backend.to_str())
            b.enable_truncation(max_length=max_length)
            b.enable_padding(length=max_length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
            _BACKENDS[key] = (tokenizer, b)  # keep the tokenizer alive so its id stays unique
    entry = _BACKENDS[key]
    return None if entry is None else entry[1]


def tokenize(tokenizer, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` int64 ``[B, max_length]`` (padded and truncated)."""
    backend = _fast_backend(tokenizer, int(max_length))
    if backend is not None:
        encs = backend.encode_batch(list(captions))
        return {"input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)}
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=int(max_length),
                    return_attention_mask=True, return_token_type_ids=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(torch.int64),
            "attention_mask": enc["attention_mask"].to(torch.int64)}
