"""Word-changed ITM negatives: the row's own caption with one attribute or relation word changed.

Mined hard negatives come from other scenes: they differ from the true caption in many words at
once, so an ITM head can reject them by checking which colours, shapes and places occur at all,
without binding a colour to its shape or reading a relation. A caption with exactly one thing
changed can only be rejected by looking at how the image is composed. Training the fused pass on
such negatives is the field's fix for compositional blindness (rule-based negatives from word
lists as in SVLC, Doveh et al. 2023; swapped-attribute captions as in NegCLIP, Yuksekgonul et al.
2023); here they are ITM negatives, costing no extra fused pass: with
``loss.itm_word_negatives = s`` a share ``s`` of the rows (those with a change that applies) use
the word-changed caption as their text negative instead of the mined one.

Word sets (``loss.word_negative_words``): ``synthetic`` (the caption vocabulary of
``mmpretrain shards synthetic``) or a YAML/JSON file::

    swap:     # two words of the group with different meanings exchange places (binding)
      colour: [[red, crimson], [green], [blue]]       # classes of synonyms
    replace:  # one word becomes a word of a class the caption does not mention
      shape: [[circle, disc], [square, box], [star]]
    flip:     # a word becomes its opposite (the first word of the other class)
      left_right: [[left], [right]]
      above_below: [[above, over], [below, under, beneath]]

Only words the tokenizer keeps as one token are used. A swap needs the tokens after the two
words to differ ("a red circle and a blue circle" swapped says the same); an English article
directly before a changed word is made to agree ("a"/"an"). A row draws one applicable group
uniformly, then the positions and the new word; the random numbers are drawn for every row of
the global batch and sliced, so the choice of a row does not depend on the world size.

``build_table(word_sets, tokenizer)`` turns the words into the integer table the model uses
(``loss.word_negative_table``, filled by the trainer and saved in the checkpoint config); rows
``[kind, group, class, token_id, starts_with_vowel]``, kind 0 swap, 1 replace, 2 flip, 3 article
(class 0 "a", 1 "an").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SWAP, REPLACE, FLIP, ARTICLE = 0, 1, 2, 3
KINDS = {"swap": SWAP, "replace": REPLACE, "flip": FLIP}


class WordNegativeError(ValueError):
    pass


def synthetic_word_sets() -> dict:
    """The caption vocabulary of the synthetic generator (mmpretrain.data.synthetic)."""
    from mmpretrain.data import synthetic as S

    return {
        "swap": {"colour": [list(words) for _, words in S.COLORS.values()],
                 "size": [list(words) for _, words in S.SIZES.values()]},
        "replace": {"shape": [list(words) for words in S.SHAPES.values()]},
        "flip": {"left_right": [["left"], ["right"]],
                 "above_below": [["above", "over"], ["below", "under", "beneath"]],
                 "top_bottom": [["top"], ["bottom"]]},
    }


def load_word_sets(spec: str) -> dict:
    """``synthetic`` or a YAML/JSON file path -> {kind: {group: [[word, ...], ...]}}."""
    if spec == "synthetic":
        return synthetic_word_sets()
    path = Path(spec)
    if not path.is_file():
        raise WordNegativeError(f"loss.word_negative_words: {spec!r} is not 'synthetic' or an existing file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error, reported with the file
        raise WordNegativeError(f"{path}: cannot parse the word sets ({e})") from None
    if not isinstance(data, dict) or not data or set(data) - set(KINDS):
        raise WordNegativeError(f"{path}: expected a mapping with keys among {sorted(KINDS)}")
    for kind, groups in data.items():
        if not isinstance(groups, dict):
            raise WordNegativeError(f"{path}: {kind!r} must map group names to lists of word classes")
        for name, classes in groups.items():
            ok = isinstance(classes, list) and len(classes) >= 2 and all(
                isinstance(c, list) and c and all(isinstance(w, str) for w in c) for c in classes)
            if not ok or (kind == "flip" and len(classes) != 2):
                need = "exactly 2" if kind == "flip" else "at least 2"
                raise WordNegativeError(f"{path}: {kind}.{name} must be a list of {need} non-empty lists of words")
    return data


def _single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(ids[0])


def build_table(word_sets: dict, tokenizer) -> list[list[int]]:
    """Integer table of the word sets under ``tokenizer`` (see the module docstring)."""
    rows: list[list[int]] = []
    seen: dict[int, str] = {}
    group_id = 0
    for kind in ("swap", "replace", "flip"):
        for name, classes in (word_sets.get(kind) or {}).items():
            for c, words in enumerate(classes):
                for w in words:
                    tid = _single_token(tokenizer, w)
                    if tid is None:
                        continue
                    if tid in seen:
                        raise WordNegativeError(f"word negatives: {w!r} ({kind}.{name}) is also in {seen[tid]}")
                    seen[tid] = f"{kind}.{name}"
                    rows.append([KINDS[kind], group_id, c, tid, int(w[:1].lower() in "aeiou")])
            group_id += 1
    for c, art in enumerate(("a", "an")):
        tid = _single_token(tokenizer, art)
        if tid is not None and tid not in seen:
            rows.append([ARTICLE, -1, c, tid, 0])
    return rows


class _Table:
    def __init__(self, rows):
        self.info: dict[int, tuple[int, int, int, int]] = {}
        self.by_class: dict[tuple[int, int], list[int]] = {}
        self.classes: dict[int, set[int]] = {}
        self.article: dict[int, int] = {}
        for kind, group, cls, tid, vowel in rows:
            if kind == ARTICLE:
                self.article[cls] = tid
                continue
            self.info[tid] = (kind, group, cls, vowel)
            self.by_class.setdefault((group, cls), []).append(tid)
            self.classes.setdefault(group, set()).add(cls)
        self.vowel = {tid: v for tid, (_, _, _, v) in self.info.items()}


def _change_row(ids: list[int], n: int, t: _Table, u: tuple[float, float, float]) -> dict[int, int] | None:
    """{position: new token} for one caption of ``n`` real tokens, or None (no change applies)."""
    by_group: dict[int, list[int]] = {}
    for p in range(n):
        if ids[p] in t.info:
            by_group.setdefault(t.info[ids[p]][1], []).append(p)
    options = []  # (group, kind, candidates)
    for g in sorted(by_group):
        pos = by_group[g]
        kind = t.info[ids[pos[0]]][0]
        if kind == SWAP:
            pairs = [(p, q) for i, p in enumerate(pos) for q in pos[i + 1:]
                     if t.info[ids[p]][2] != t.info[ids[q]][2]
                     and (ids[p + 1] if p + 1 < n else -1) != (ids[q + 1] if q + 1 < n else -1)]
            if pairs:
                options.append((kind, pairs))
        elif kind == REPLACE:
            present = {t.info[ids[p]][2] for p in pos}
            absent = sorted(t.classes[g] - present)
            if absent:
                options.append((kind, [(p, c) for p in pos for c in absent]))
        else:
            options.append((kind, pos))
    if not options:
        return None
    kind, cands = options[min(int(u[0] * len(options)), len(options) - 1)]
    pick = cands[min(int(u[1] * len(cands)), len(cands) - 1)]
    if kind == SWAP:
        p, q = pick
        return {p: ids[q], q: ids[p]}
    if kind == REPLACE:
        p, c = pick
        words = t.by_class[(t.info[ids[p]][1], c)]
    else:
        p = pick
        _, g, c, _ = t.info[ids[p]]
        words = t.by_class[(g, 1 - c)][:1]
    return {p: words[min(int(u[2] * len(words)), len(words) - 1)]}


def word_negatives(input_ids: torch.Tensor, attention_mask: torch.Tensor, table: list, share: float,
                   generator: torch.Generator | None, row_offset: int = 0, n_rows: int | None = None):
    """Word-changed copies of the local captions -> (ids [B, L], chosen [B] bool).

    ``chosen`` marks the rows that take the changed caption: a change applies and the row falls
    in ``share``. The random numbers are drawn for the ``n_rows`` rows of the global batch
    (default: the local batch) and the local rows ``row_offset : row_offset + B`` are used.
    """
    b = input_ids.shape[0]
    n_rows = b if n_rows is None else n_rows
    u = torch.rand(n_rows, 4, generator=generator, dtype=torch.float64)[row_offset:row_offset + b].tolist()
    t = _Table(table)
    ids_l = input_ids.tolist()
    lengths = attention_mask.sum(dim=1).tolist()
    out = [list(r) for r in ids_l]
    chosen = [False] * b
    for i in range(b):
        if u[i][0] >= share:
            continue
        change = _change_row(ids_l[i], int(lengths[i]), t, (u[i][1], u[i][2], u[i][3]))
        if change is None:
            continue
        chosen[i] = True
        for p, tid in change.items():
            out[i][p] = tid
            prev = ids_l[i][p - 1] if p > 0 else None
            if t.article and prev in t.article.values() and len(t.article) == 2:
                out[i][p - 1] = t.article[t.vowel[tid]]
    return (torch.tensor(out, dtype=input_ids.dtype, device=input_ids.device),
            torch.tensor(chosen, dtype=torch.bool, device=input_ids.device))
