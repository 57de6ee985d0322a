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
* anything else: a hub name, taken from the local Hugging Face cache when it is there, else
  downloaded — unless ``HF_HUB_OFFLINE=1`` (then a name not in the cache fails at once; without
  a network and without that variable the hub client retries for about a minute). Either way a
  name that cannot be loaded fails on one line naming ``data.tokenizer`` (``check_tokenizer``,
  run by the trainer before anything is written; for 'auto' it checks, writing nothing, that the
  shards hold a caption to train on unless the tokenizer is there already).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmpretrain.data.shardio import expand_sources, iter_shard_samples

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


def iter_captions(urls: list[str]):
    """Each non-empty caption of the shards in order (raw read, no image decoding): the text of a
    sample's ``txt`` member, UTF-8, stripped; samples without one, or whose text is not UTF-8 or
    only white space, are passed over."""
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
                yield text


def read_captions(urls: list[str]) -> list[str]:
    """Every non-empty caption of the shards (``iter_captions``)."""
    return list(iter_captions(urls))


def _auto_target(urls: list[str]) -> Path:
    """Where 'auto' keeps its tokenizer: ``tokenizer/`` beside the first shard, or for remote
    shards a cache directory keyed by the source list."""
    shard_dir = _shard_dir(urls[0])
    if shard_dir is None:  # remote shards: cache keyed by the source list
        digest = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]
        shard_dir = Path(os.environ.get("MMPRETRAIN_CACHE", Path.home() / ".cache" / "mmpretrain")) / digest
    return shard_dir / TOKENIZER_DIRNAME


def _no_captions(urls: list[str], shard_sources) -> str:
    """The one line for train shards that hold no caption to train 'auto' on."""
    shown = urls[0] if len(urls) == 1 else f"{urls[0]} ... {urls[-1]}"
    where = f"1 shard ({shown}) holds" if len(urls) == 1 else f"{len(urls)} shards ({shown}) hold"
    return (f"data.tokenizer='auto' trains a tokenizer from the captions of data.train_shards={shard_sources!r}, "
            f"but its {where} no sample with a readable caption (a non-empty UTF-8 .txt member); add captions "
            "to the shards, or set data.tokenizer to a tokenizer directory saved with save_pretrained")


def _load_named(spec: str):
    """A tokenizer that is not 'auto': a local directory, or a hub name (the local cache first,
    then a download unless ``HF_HUB_OFFLINE=1``); ``ValueError`` on one line naming
    ``data.tokenizer`` otherwise."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - rephrase for the offline default
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if not offline and not os.path.exists(spec):
            try:  # a hub name not cached yet: download it
                return AutoTokenizer.from_pretrained(spec)
            except Exception as e2:  # noqa: BLE001
                why = " ".join(str(e2).split())[:200]
                raise ValueError(f"data.tokenizer={spec!r} is not a local tokenizer directory or file, not in the "
                                 f"local Hugging Face cache, and its download failed ({type(e2).__name__}: {why}); "
                                 "use 'auto' to train one from the shard captions, or a directory saved with "
                                 "save_pretrained") from None
        if os.path.isdir(spec):
            why = " ".join(str(e).split())[:200]
            what = f"is a directory that holds no loadable tokenizer ({type(e).__name__}: {why})"
        elif os.path.exists(spec):
            what = "is a file, not a tokenizer directory (one saved with save_pretrained)"
        else:
            what = ("is not a local tokenizer directory or file, nor a hub name in the local cache "
                    "(HF_HUB_OFFLINE=1: no download is tried)")
        raise ValueError(f"data.tokenizer={spec!r} {what}; use 'auto' to train one from the shard captions, or "
                         "a directory saved with save_pretrained") from None


def check_tokenizer(spec: str, shard_sources: list[str] | str | None = None) -> None:
    """Start-up check of ``data.tokenizer``, writing nothing; ``ValueError`` naming the key when
    ``load_tokenizer`` would fail. A name: a tokenizer loaded without a network (it is loaded
    once here). 'auto' with ``shard_sources`` (``data.train_shards``): its tokenizer is there
    already, or the shards hold a caption to train one on (read up to the first caption)."""
    if spec != "auto":
        _load_named(spec)
        return
    if shard_sources is None:
        return
    urls = expand_sources(shard_sources)
    if not urls:
        raise ValueError(f"data.tokenizer='auto' needs shards to train from; none match {shard_sources!r}")
    if (_auto_target(urls) / "tokenizer_config.json").exists():
        return
    if next(iter_captions(urls), None) is None:
        raise ValueError(_no_captions(urls, shard_sources))


def load_tokenizer(spec: str, shard_sources: list[str] | str | None, vocab_size: int = 4096, *,
                   save: bool = True):
    """Resolve ``data.tokenizer`` (see module docstring). ``save=False`` trains in memory only."""
    from transformers import AutoTokenizer

    if spec != "auto":
        return _load_named(spec)

    urls = expand_sources(shard_sources or [])
    if not urls:
        raise ValueError(f"data.tokenizer='auto' needs shards to train from; none match {shard_sources!r}")
    target = _auto_target(urls)
    if (target / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(target))
    captions = read_captions(urls)
    if not captions:  # the trainer's check_tokenizer names data.train_shards before this
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

# BertNormalizer's clean_text on ASCII: drop the control characters (Cc) except \t \n \r, and
# map \t \n \r to a space (see ``FastTokenizer``)
_ASCII_CLEAN = {c: None for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
_ASCII_CLEAN.update({0x09: 0x20, 0x0A: 0x20, 0x0D: 0x20})


class FastTokenizer:
    """The Rust ``tokenizers`` backend of a Hugging Face fast tokenizer, configured once (per
    process) to pad and truncate to ``max_length``; gives the ids / masks of
    ``tokenizer(texts, padding="max_length", truncation=True, max_length=L)`` as int64 numpy
    arrays, without the per-call Python overhead of ``transformers``.

    ASCII shortcut: when the backend's normalizer is a ``BertNormalizer`` (the tokenizer
    ``train_tokenizer`` builds), captions that are pure ASCII and contain no character that
    starts an added token (``[`` for ``[CLS]``, ``[PAD]``, ...) are normalized in Python
    (``str.translate`` + ``str.lower``, exactly what ``BertNormalizer`` does to ASCII text: on
    ASCII, accent stripping and CJK spacing change nothing) and encoded by a copy of the backend
    without a normalizer, which skips the Rust normalizer's per-character alignment bookkeeping
    (about a third of the encoding time for short captions). Every other caption goes through
    the full backend. Batches that are all ASCII-shortcut captions skip the Rust pipeline as
    well for BERT pre-tokenizer + WordPiece tokenizers (``_setup_word_cache``).
    ``tests/test_tokenizer.py`` checks the equality against the ``transformers`` call, over
    every ASCII character too.
    """

    def __init__(self, tokenizer, max_length: int):
        import json

        from tokenizers import Tokenizer

        self.max_length = int(max_length)
        spec = tokenizer.backend_tokenizer.to_str()
        self.full = self._configure(Tokenizer.from_str(spec), tokenizer)
        self.plain = None
        state = json.loads(spec)
        norm = state.get("normalizer") or {}
        added = state.get("added_tokens", [])
        # added tokens matched after normalization would be matched against un-normalized text
        # by a backend without a normalizer: no shortcut for such tokenizers
        if norm.get("type") == "BertNormalizer" and not any(t.get("normalized") for t in added):
            plain = Tokenizer.from_str(spec)
            plain.normalizer = None
            self.plain = self._configure(plain, tokenizer)
            self._table = _ASCII_CLEAN if norm.get("clean_text", True) else {}
            self._lower = bool(norm.get("lowercase", True))
            self._starts = frozenset(t["content"][:1] for t in added if t.get("content"))
        encode = "encode_batch_fast" if hasattr(self.full, "encode_batch_fast") else "encode_batch"  # tokenizers>=0.20
        self._encode_full = getattr(self.full, encode)
        self._encode_plain = getattr(self.plain, encode) if self.plain is not None else None
        self._words = None
        if self.plain is not None and (state.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer" \
                and (state.get("model") or {}).get("type") == "WordPiece":
            self._setup_word_cache(spec, tokenizer.pad_token_id)

    def _setup_word_cache(self, spec: str, pad_id: int) -> None:
        """Word-level shortcut for the ASCII path: the BERT pre-tokenizer on normalized ASCII
        text is "split on ASCII whitespace, isolate ASCII punctuation" (a regex), WordPiece
        tokenizes each word on its own (the Rust model, cached per word), and the post-processor
        puts fixed special tokens around the truncated word pieces. The prefix / suffix are read
        from the backend (an empty and a one-word probe); anything unexpected disables it."""
        import re
        import string

        from tokenizers import Tokenizer

        probe = Tokenizer.from_str(spec)
        probe.normalizer = None
        probe.no_padding()
        probe.no_truncation()
        empty = probe.encode("").ids
        word = probe.model.tokenize("a")
        one = probe.encode("a").ids
        k = next((k for k in range(len(empty) + 1) if empty[:k] + [t.id for t in word] + empty[k:] == one), None)
        if k is None or self.max_length < len(empty) or probe.post_processor is None:
            return
        self._prefix, self._suffix, self._room = empty[:k], empty[k:], self.max_length - len(empty)
        self._model_tokenize = probe.model.tokenize
        self._pad_id = int(pad_id)
        punct = re.escape(string.punctuation)
        self._split = re.compile(f"[^ \\t\\n\\x0b\\x0c\\r{punct}]+|[{punct}]").findall
        self._words: dict[str, list[int]] | None = {}
        self._probe = probe  # keeps the model alive

    def _word_ids(self, text: str) -> list[int]:
        """The ids of normalized ASCII ``text`` (see ``_setup_word_cache``), unpadded."""
        words = self._words
        ids: list[int] = []
        for w in self._split(text):
            piece = words.get(w)
            if piece is None:
                piece = [t.id for t in self._model_tokenize(w)]
                if len(words) >= 200_000:
                    words.clear()
                words[w] = piece
            ids += piece
        return self._prefix + ids[:self._room] + self._suffix

    def _configure(self, backend, tokenizer):
        backend.no_truncation()
        backend.no_padding()
        backend.enable_truncation(max_length=self.max_length)
        backend.enable_padding(length=self.max_length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
        return backend

    def _plain_text(self, text: str) -> str | None:
        """``text`` normalized in Python, or None when it needs the full backend."""
        if not text.isascii() or (self._starts and not self._starts.isdisjoint(text)):
            return None
        text = text.translate(self._table) if self._table else text
        return text.lower() if self._lower else text

    def encode(self, texts: list[str]) -> tuple["np.ndarray", "np.ndarray"]:
        """int64 ``(input_ids, attention_mask)``, both ``[len(texts), max_length]``."""
        import numpy as np

        texts = list(texts)
        n = len(texts)
        if n == 0:
            empty = np.zeros((0, self.max_length), dtype=np.int64)
            return empty, empty.copy()
        if self.plain is None:
            encs = self._encode_full(texts)
        else:
            plain = [self._plain_text(t) for t in texts]
            slow = [i for i, t in enumerate(plain) if t is None]
            if not slow and self._words is not None:
                rows = [self._word_ids(t) for t in plain]
                L = self.max_length
                lengths = np.fromiter(map(len, rows), dtype=np.int64, count=n)
                ids = np.full((n, L), self._pad_id, dtype=np.int64)
                flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
                mask = (np.arange(L) < lengths[:, None]).astype(np.int64)
                ids[mask.astype(bool)] = flat
                return ids, mask
            if not slow:
                encs = self._encode_plain(plain)
            elif len(slow) == n:
                encs = self._encode_full(texts)
            else:
                fast = [i for i, t in enumerate(plain) if t is not None]
                encs = [None] * n
                for i, e in zip(fast, self._encode_plain([plain[i] for i in fast])):
                    encs[i] = e
                for i, e in zip(slow, self._encode_full([texts[i] for i in slow])):
                    encs[i] = e
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask


def _fast_backend(tokenizer, max_length: int) -> FastTokenizer | None:
    """The tokenizer's ``FastTokenizer`` for ``max_length`` (built once per process), or None
    when the tokenizer has no Rust backend, no pad token, or pads / truncates on the left."""
    key = (id(tokenizer), max_length)
    if key not in _BACKENDS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.pad_token_id is None or getattr(tokenizer, "padding_side", "right") != "right" \
                or getattr(tokenizer, "truncation_side", "right") != "right":
            _BACKENDS[key] = None
        else:
            _BACKENDS[key] = (tokenizer, FastTokenizer(tokenizer, max_length))  # keep the tokenizer alive: id stays unique
    entry = _BACKENDS[key]
    return None if entry is None else entry[1]


def tokenize_np(tokenizer, captions: list[str], max_length: int):
    """int64 numpy ``(input_ids, attention_mask)`` ``[B, max_length]`` (padded and truncated)."""
    import numpy as np

    fast = _fast_backend(tokenizer, int(max_length))
    if fast is not None:
        return fast.encode(captions)
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=int(max_length),
                    return_attention_mask=True, return_token_type_ids=False, return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["attention_mask"], dtype=np.int64)


def tokenize(tokenizer, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` int64 ``[B, max_length]`` (padded and truncated)."""
    ids, mask = tokenize_np(tokenizer, captions, max_length)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
