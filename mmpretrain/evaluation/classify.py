"""Zero-shot classification (CLIP / open_clip / CLIP_benchmark protocol), with ITM re-scoring.

    mmpretrain eval --checkpoint CKPT --classify DIR [--label-field label] [--templates T ...]

**Input** (``load_classify_set``), DIR is one of:

- an ImageFolder tree: one sub-folder per class holding its images (``.jpg .jpeg .png .webp
  .bmp``, also in nested folders); the class name is the folder name with underscores as
  spaces (``pickup_truck`` -> "pickup truck"); classes in sorted folder order;
- WebDataset shards (a directory of ``*.tar``, a glob or brace pattern, one ``.tar``) whose
  sample json holds the class name as a string in ``label`` (``--label-field`` /
  ``eval.classify_label_field`` names another field: the synthetic split also has ``color``).
  Classes: the ``classes`` list the shard directory's ``manifest.json`` gives for the field
  (``"classify": {"labels": {field: {"classes": [...], "templates": [...]}}}``, written by
  ``mmpretrain shards synthetic``), else the sorted label values found.

Images go through the evaluation transform of the held-out set (``data.image_size``, resize +
centre crop, ``data.mean``/``data.std``), a chunk of ``8 x eval.batch_size`` at a time (ImageFolder
files are read when their chunk comes; shard samples are held as encoded bytes). Unreadable
images are skipped and counted (``skipped_images``, with the shard samples lacking an image or
the label field).

**Class embeddings** (CLIP's prompt ensembling): each class name is put into every prompt
template (``{}`` marks the name; "a {}" becomes "an {}" before a vowel), each prompt is
embedded with ``encode_text`` and L2-normalised, the template embeddings of a class are
averaged and the mean is L2-normalised again. Templates, first that applies: the explicit list
(``--templates`` / ``eval.classify_templates``), the dataset's own (its manifest's
``templates`` for the label field; like CLIP_benchmark's per-dataset templates), else
``DEFAULT_TEMPLATES``.

**Scores.** Cosine of the L2-normalised image embedding (``encode_image``) and each class
embedding. Top-k accuracy with the project's pessimistic tie rule (retrieval.py): the rank of
an image is the number of wrong classes scoring at least as high as its class, right at k when
the rank is below k. Reported in percent: ``top1``, ``top5``, ``mean_per_class`` (the mean of
the per-class top-1 accuracies, CLIP_benchmark's "mean per-class recall"), ``per_class``
(``{name: {"n", "top1", "top5"}}``) and the chance levels of a uniform guess (``chance_top1`` =
100/C, ``chance_top5`` = 100 min(5, C)/C).

**ITM re-scoring** (unified arch or any model with a trained ITM head): the top
``eval.classify_itm_k`` classes of each image by cosine are re-scored with the fused ITM head,
log-odds ``logit[match] - logit[no match]`` of the image with the class's prompt whose
embedding is closest to the image (``eval.classify_itm_prompts: best``, the default: k fused
passes per image), or the mean over all its templates' prompts (``mean``: k x templates passes). The combination rule is the
retrieval re-ranking's ``eval.itm_rerank_score``: ``itm+itc`` adds the contrastive logit
(``logit_scale`` x the class cosine), ``itm`` uses the log-odds alone (and a model trained with
``model.itm_contrastive_prior`` falls back to ``itm``, as in the retrieval evaluation). The
re-scored classes rank above all others (``retrieval.rerank_scores``). Skipped with a reason
when ``classify_itm_k`` is 0 or the model has no trained ITM head (``loss.itm_weight=0``).

**Linear probe** (``eval.classify_linear_probe``, on by default; CLIP_benchmark's other
protocol): what the image tower encodes, whether or not the text side names it. A multinomial
logistic regression on the L2-normalised image embeddings (standardised per feature, L2 penalty
``1e-3 x |W|^2``, float64 L-BFGS) is fitted on 3 of 4 folds (the images in key order dealt to
folds by a fixed-seed permutation) and scored on the fourth; ``linear_probe.top1`` is the mean held-out
top-1 over the 4 folds. A zero-shot figure near chance with a high probe figure means the
alignment with the class words is missing; both near chance means the image tower does not see
the property. Deterministic; no text pass.

Processes: one, or every rank of a launch, each embedding a strided share of the images; model
calls are padded to the same count on every rank (ZeRO-3) and the per-image results gathered,
so every rank returns the same dict.
"""

from __future__ import annotations

import glob as globmod
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
"""The default prompt set (a small subset of CLIP's ImageNet ensemble), used when neither the
config nor the dataset names templates."""
LABEL_FIELD = "label"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SHARD_EXTS = (".tar",)


class ClassifyError(ValueError):
    """Bad zero-shot input: a one-line message naming the path."""


@dataclass
class ClassifySet:
    """The labelled images: ``images[i]`` (encoded bytes, or the file holding them: an
    ImageFolder is read lazily) has class ``labels[i]`` of ``classes``."""
    source: str
    format: str  # "imagefolder" | "shards"
    label_field: str | None
    classes: list[str]
    images: list[bytes | Path]
    labels: list[int]
    keys: list[str]
    templates: list[str] | None = None  # the dataset's own templates, if it names them
    skipped: int = 0
    extra: dict = field(default_factory=dict)

    def image_bytes(self, i: int) -> bytes:
        im = self.images[i]
        return im.read_bytes() if isinstance(im, Path) else im


# ----------------------------------------------------------------------------- input

def _folder_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _load_imagefolder(root: Path, max_images: int) -> ClassifySet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ClassifyError(f"{root}: no class folders (ImageFolder layout: {root}/<class>/<image>.jpg) "
                            "and no .tar shards")
    classes, images, labels, keys = [], [], [], []
    for c, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ClassifyError(f"{folder}: class folder holds no image ({', '.join(IMAGE_EXTS)})")
        classes.append(_folder_name(folder.name))
        for f in files:
            images.append(f)
            labels.append(c)
            keys.append(str(f.relative_to(root)))
    if len(set(classes)) != len(classes):
        dup = sorted({n for n in classes if classes.count(n) > 1})
        raise ClassifyError(f"{root}: class folders give the same class name twice: {dup}")
    out = ClassifySet(str(root), "imagefolder", None, classes, images, labels, keys)
    return _cap(out, max_images)


def _cap(s: ClassifySet, max_images: int) -> ClassifySet:
    """The first ``max_images`` images in key order (0: all)."""
    order = sorted(range(len(s.keys)), key=lambda i: s.keys[i])
    if max_images > 0:
        order = order[:max_images]
    s.images = [s.images[i] for i in order]
    s.labels = [s.labels[i] for i in order]
    s.keys = [s.keys[i] for i in order]
    return s


def _shard_manifest_info(urls: list[str], label_field: str) -> dict:
    """``classify.labels[label_field]`` of the manifest beside the first shard ({} if none)."""
    path = Path(urls[0]).parent / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return dict(manifest.get("classify", {}).get("labels", {}).get(label_field, {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _read_tar(url: str) -> dict[str, dict[str, bytes]]:
    """WebDataset samples of one tar: ``{key: {ext: bytes}}`` (key: path up to the first dot of
    the file name, as webdataset splits it)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            d, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            f = tar.extractfile(member)
            if f is not None:
                samples.setdefault(os.path.join(d, stem), {})[ext.lower()] = f.read()
    return samples


def _load_shards(spec: str, urls: list[str], label_field: str, max_images: int) -> ClassifySet:
    images, names, keys = [], [], []
    skipped = 0
    for url in urls:
        try:
            samples = _read_tar(url)
        except (OSError, EOFError) as e:
            raise ClassifyError(f"{url}: not a readable tar shard ({e})") from None
        for key, fields in samples.items():
            image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
            try:
                meta = json.loads(fields["json"]) if "json" in fields else {}
            except ValueError:
                meta = {}
            label = meta.get(label_field) if isinstance(meta, dict) else None
            if image is None or label is None:
                skipped += 1
                continue
            if not isinstance(label, str):
                raise ClassifyError(f"{url}: sample {key}: json field {label_field!r} is {label!r}, "
                                    "not a class-name string")
            images.append(image)
            names.append(label)
            keys.append(key)
    if not images:
        hint = f"; the labelled split is {Path(spec) / 'classify'}" if (Path(spec) / "classify").is_dir() else ""
        raise ClassifyError(f"{spec}: no sample has an image and a json field {label_field!r} "
                            f"(the class name; --label-field names another field){hint}")
    info = _shard_manifest_info(urls, label_field)
    classes = [str(c) for c in info.get("classes", [])] or sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ClassifyError(f"{spec}: labels {unknown[:5]} are not in the manifest's classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    templates = [str(t) for t in info.get("templates", [])] or None
    out = ClassifySet(spec, "shards", label_field, classes, images, [index[n] for n in names], keys,
                      templates=templates, skipped=skipped)
    return _cap(out, max_images)


def load_classify_set(path: str | os.PathLike, label_field: str = LABEL_FIELD, max_images: int = 0) -> ClassifySet:
    """An ImageFolder tree or labelled WebDataset shards (see the module docstring); raises
    ``ClassifyError`` (one line naming the path) for input that cannot be classified."""
    spec = str(path)
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(u) for u in p.iterdir() if u.is_file() and u.name.endswith(_SHARD_EXTS))
        if not urls:
            if not any(p.iterdir()):
                raise ClassifyError(f"{spec}: empty directory (expected class folders or .tar shards)")
            s = _load_imagefolder(p, max_images)
        else:
            s = _load_shards(spec, urls, label_field, max_images)
    elif p.is_file():
        if not spec.endswith(_SHARD_EXTS):
            raise ClassifyError(f"{spec}: not a directory or a .tar shard")
        s = _load_shards(spec, [spec], label_field, max_images)
    else:
        import braceexpand

        urls = sorted({u for item in braceexpand.braceexpand(spec) for u in globmod.glob(item)
                       if u.endswith(_SHARD_EXTS)})
        if not urls:
            raise ClassifyError(f"{spec}: no such directory, and no .tar shards match it")
        s = _load_shards(spec, urls, label_field, max_images)
    present = sorted(set(s.labels))
    if len(s.classes) < 2:
        raise ClassifyError(f"{spec}: {len(s.classes)} class ({', '.join(s.classes)}); zero-shot "
                            "classification needs at least 2")
    if len(present) < 2 and max_images <= 0:
        raise ClassifyError(f"{spec}: every image has the same label ({s.classes[present[0]]}); "
                            "zero-shot classification needs images of at least 2 classes")
    return s


def read_templates(values: list[str]) -> list[str]:
    """Templates from ``--templates`` values: each a template, or a file of templates (one per
    line; blank lines and ``#`` comments ignored)."""
    out: list[str] = []
    for v in values:
        if "{}" not in v and Path(v).is_file():
            out += [ln.strip() for ln in Path(v).read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.strip().startswith("#")]
        else:
            out.append(v)
    return out


def check_templates(templates: list[str], where: str = "templates") -> list[str]:
    if not templates:
        raise ClassifyError(f"{where}: no template given")
    for t in templates:
        if t.count("{}") != 1:
            raise ClassifyError(f"{where}: template {t!r} must hold '{{}}' (the class name) exactly once")
    return list(templates)


_ARTICLE_RE = re.compile(r"\b([Aa]) \{\}")


def render_prompt(template: str, name: str) -> str:
    """``template`` with ``name`` in its ``{}``; "a {}" becomes "an {}" before a vowel."""
    if name[:1].lower() in "aeiou":
        template = _ARTICLE_RE.sub(lambda m: m.group(1) + "n {}", template)
    return template.replace("{}", name)


# ----------------------------------------------------------------------------- pure math

def class_embeddings(prompt_emb: torch.Tensor, num_classes: int, num_templates: int) -> torch.Tensor:
    """``[C, E]``: per class, the mean of its L2-normalised template embeddings, L2-normalised
    (CLIP's prompt ensembling). ``prompt_emb``: ``[C * T, E]``, class-major (class c, template
    t at row ``c * T + t``)."""
    e = torch.nn.functional.normalize(prompt_emb.double(), dim=-1).view(num_classes, num_templates, -1)
    return torch.nn.functional.normalize(e.mean(dim=1), dim=-1)


def class_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each image's class: wrong classes scoring ``>=`` it."""
    from mmpretrain.evaluation.retrieval import pessimistic_ranks

    pos = torch.zeros(scores.shape, dtype=torch.bool)
    pos[torch.arange(scores.shape[0]), labels.long()] = True
    return pessimistic_ranks(scores, pos)


def accuracy_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: list[str],
                     ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k (percent), per-class and mean per-class top-1 accuracy of ``scores`` ``[N, C]``."""
    ranks = class_ranks(scores, labels)
    labels = labels.long()
    out: dict[str, Any] = {}
    for k in ks:
        out[f"top{k}"] = 100.0 * float((ranks < k).double().mean()) if ranks.numel() else 0.0
    per_class = {}
    for c, name in enumerate(classes):
        sel = labels == c
        n = int(sel.sum())
        row: dict[str, Any] = {"n": n}
        for k in ks:
            row[f"top{k}"] = 100.0 * float((ranks[sel] < k).double().mean()) if n else None
        per_class[name] = row
    present = [r["top1"] for r in per_class.values() if r["n"]]
    out["mean_per_class"] = sum(present) / len(present) if present else 0.0
    out["per_class"] = per_class
    return out


def rescore_topk(scores: torch.Tensor, k: int, score_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Scores with the top-``k`` classes of each row (by ``scores``, ties: lower index) re-scored
    by ``score_fn(candidates [N, k]) -> [N, k]`` and ranked above the rest (``rerank_scores``)."""
    from mmpretrain.evaluation.retrieval import rerank_scores, topk_candidates

    cand = topk_candidates(scores, k)
    return rerank_scores(scores, cand, score_fn(cand).double()), cand


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int = 4,
                 l2: float = 1e-3, max_iter: int = 100) -> dict:
    """Mean held-out top-1 (percent) of a multinomial logistic regression over ``folds`` folds
    (rows dealt to folds by a fixed-seed permutation, so periodic label orders cannot empty a
    class from a training split); see the module docstring. Needs every class in
    each training split to be meaningful; folds with fewer than 2 training classes are skipped."""
    x = features.detach().double()
    y = labels.long()
    n = x.shape[0]
    accs: list[float] = []
    fold_of = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % folds
    for f in range(folds):
        test = fold_of == f
        train = ~test
        if int(test.sum()) == 0 or len(torch.unique(y[train])) < 2:
            continue
        mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
        xt, xv = (x[train] - mu) / sd, (x[test] - mu) / sd
        w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, y[train]) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            accs.append(100.0 * float(((xv @ w + b).argmax(1) == y[test]).double().mean()))
    return {"top1": sum(accs) / len(accs) if accs else None, "folds": len(accs), "l2": l2,
            "features": "image embedding (L2-normalised, standardised)"}


def chance(num_classes: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    return {f"chance_top{k}": 100.0 * min(k, num_classes) / num_classes for k in ks}


# ----------------------------------------------------------------------------- model passes

def _pixels(data: ClassifySet, i: int, cfg) -> torch.Tensor | None:
    """uint8 ``[3, S, S]`` of image ``i`` (the held-out eval transform), None if unreadable."""
    from mmpretrain.data.transforms import eval_transform

    try:
        return eval_transform(data.image_bytes(i), int(cfg.data.image_size),
                              int(getattr(cfg.data, "max_pixels", 50_000_000)))
    except Exception:  # noqa: BLE001 - a corrupt or oversized image is skipped and counted
        return None


@torch.no_grad()
def _encode_images(model, cfg, accelerator, pixels: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalised fp32 CPU image embeddings of this rank's images (padded calls)."""
    from mmpretrain.data.transforms import normalize
    from mmpretrain.evaluation.evaluate import _padded_calls, _placement, _unwrap

    core = _unwrap(model, accelerator)
    device, dtype, autocast = _placement(core, accelerator)
    bs = max(int(cfg.eval.batch_size), 1)
    s = int(cfg.data.image_size)
    out = []
    with autocast:
        for c in range(_padded_calls(accelerator, len(pixels), bs)):
            chunk = pixels[c * bs:(c + 1) * bs]
            px = torch.stack(chunk) if chunk else torch.zeros(1, 3, s, s, dtype=torch.uint8)
            emb = core.encode_image(normalize(px.to(device), cfg.data.mean, cfg.data.std, dtype))[1]
            if chunk:
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _itm_rescore(model, cfg, accelerator, pix, img_emb, cos, prompt_unit, tok, k, T, how, scale, itm_logodds):
    """Scores ``[n, C]`` of one chunk with its top-``k`` classes re-scored by ITM (``how``:
    'best' prompt or 'mean' over the templates; plus ``scale`` x cosine). Every rank calls it
    (``itm_logodds`` pads the model calls), with no image too."""
    if not pix:
        itm_logodds(model, cfg, accelerator, [], tok["input_ids"][:0], tok["attention_mask"][:0])
        return torch.zeros(0, cos.shape[1], dtype=torch.float64)
    prompt_cos = img_emb @ prompt_unit.t()  # [n, C*T]

    def score_fn(cand: torch.Tensor) -> torch.Tensor:
        pairs = []  # (image in chunk, class, template)
        for r in range(cand.shape[0]):
            for c in cand[r].tolist():
                if how == "best":
                    pairs.append((r, c, int(torch.argmax(prompt_cos[r, c * T:(c + 1) * T]))))
                else:
                    pairs += [(r, c, t) for t in range(T)]
        rows = torch.tensor([c * T + t for _, c, t in pairs], dtype=torch.long)
        lo = itm_logodds(model, cfg, accelerator, [pix[r] for r, _, _ in pairs],
                         tok["input_ids"][rows], tok["attention_mask"][rows])
        acc: dict[tuple[int, int], list[float]] = {}
        for (r, c, _), v in zip(pairs, lo):
            acc.setdefault((r, c), []).append(v)
        new = torch.tensor([[sum(acc[(r, c)]) / len(acc[(r, c)]) for c in cand[r].tolist()]
                            for r in range(cand.shape[0])], dtype=torch.float64).view(cand.shape)
        if scale:
            new = new + scale * cos.double().gather(1, cand.long())
        return new

    return rescore_topk(cos, k, score_fn)[0]


@torch.no_grad()
def zero_shot(model, cfg, accelerator, tokenizer, data: ClassifySet, *, templates: list[str] | None = None,
              templates_from: str = "config") -> dict:
    """The zero-shot result of ``model`` on ``data`` (see the module docstring); every rank
    calls it and gets the same dict. ``templates``: the list to use (None: the dataset's own,
    else ``DEFAULT_TEMPLATES``)."""
    from mmpretrain.data.tokenizer import tokenize
    from mmpretrain.evaluation.evaluate import (
        _gather_objects, _logit_scale, _padded_calls, _unwrap, _world, encode_texts, itm_logodds)

    if templates is None:
        templates, templates_from = (list(data.templates), "dataset") if data.templates else \
            (list(DEFAULT_TEMPLATES), "default")
    templates = check_templates(templates)
    rank, world = _world(accelerator)
    core = _unwrap(model, accelerator)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        C, T = len(data.classes), len(templates)
        prompts = [render_prompt(t, name) for name in data.classes for t in templates]
        tok = tokenize(tokenizer, prompts, int(cfg.data.max_length))
        prompt_emb = encode_texts(model, cfg, accelerator, tok["input_ids"], tok["attention_mask"])  # [C*T, E]
        class_emb = class_embeddings(prompt_emb, C, T).float()
        t_text = time.perf_counter() - t0
        # ITM re-scoring of the top-k classes (every rank runs it: padded calls inside)
        k = min(int(cfg.eval.classify_itm_k), C)
        itm_ok = float(cfg.loss.itm_weight) > 0 and hasattr(core, "itm_logits")
        itm_note = None if (k > 0 and itm_ok) else (
            "eval.classify_itm_k=0" if k <= 0 else "the model has no trained ITM head (loss.itm_weight=0)")
        mode = cfg.eval.itm_rerank_score
        how = cfg.eval.classify_itm_prompts
        scale = 0.0
        if itm_note is None:
            if mode == "itm+itc" and getattr(core.model_cfg, "itm_contrastive_prior", False):
                warnings.warn("eval.itm_rerank_score=itm+itc with model.itm_contrastive_prior: re-scoring by "
                              "'itm' (the prior already adds the contrastive logit)", stacklevel=2)
                mode = "itm"
            scale = _logit_scale(core) if mode == "itm+itc" else 0.0
        prompt_unit = torch.nn.functional.normalize(prompt_emb, dim=-1)

        # This rank's images, a chunk at a time (decoded pixels are dropped after their chunk,
        # so memory does not grow with the set); every rank makes the same number of chunks.
        mine = list(range(rank, len(data.images), world))
        chunk = max(int(cfg.eval.batch_size), 1) * 8
        idx: list[int] = []
        cos_parts: list[torch.Tensor] = []
        emb_parts: list[torch.Tensor] = []
        itm_parts: list[torch.Tensor] = []
        bad = 0
        contrastive_seconds = itm_seconds = 0.0
        for c in range(_padded_calls(accelerator, len(mine), chunk)):
            t1 = time.perf_counter()
            decoded = [(i, _pixels(data, i, cfg)) for i in mine[c * chunk:(c + 1) * chunk]]
            bad += sum(px is None for _, px in decoded)
            decoded = [(i, px) for i, px in decoded if px is not None]
            pix = [px for _, px in decoded]
            img_emb = _encode_images(model, cfg, accelerator, pix)
            cos = img_emb @ class_emb.t() if pix else torch.zeros(0, C)  # [n, C]
            idx += [i for i, _ in decoded]
            cos_parts.append(cos)
            emb_parts.append(img_emb.float() if pix else torch.zeros(0, class_emb.shape[1]))
            t2 = time.perf_counter()
            contrastive_seconds += t2 - t1
            if itm_note is None:
                itm_parts.append(_itm_rescore(model, cfg, accelerator, pix, img_emb, cos, prompt_unit, tok, k, T,
                                              how, scale, itm_logodds))
                itm_seconds += time.perf_counter() - t2
        cos = torch.cat(cos_parts) if cos_parts else torch.zeros(0, C)
        emb = torch.cat(emb_parts) if emb_parts else torch.zeros(0, class_emb.shape[1])
        itm_local = torch.cat(itm_parts) if itm_parts else None
        contrastive_seconds += t_text
    finally:
        if was_training:
            model.train()

    probe = bool(getattr(cfg.eval, "classify_linear_probe", True))
    parts = _gather_objects({"idx": idx, "cos": cos, "itm": itm_local, "bad": bad,
                             "emb": emb if probe else None}, accelerator)
    order = sorted((i, p, j) for p, part in enumerate(parts) for j, i in enumerate(part["idx"]))
    if not order:
        raise ClassifyError(f"{data.source}: no image could be decoded")
    scores = torch.stack([parts[p]["cos"][j] for _, p, j in order]).double()
    labels = torch.tensor([data.labels[i] for i, _, _ in order], dtype=torch.long)
    result: dict[str, Any] = {
        "source": data.source, "format": data.format, "label_field": data.label_field,
        "num_images": len(order), "num_classes": C, "classes": list(data.classes),
        "templates": templates, "templates_from": templates_from,
        "skipped_images": data.skipped + sum(int(p["bad"]) for p in parts),
    }
    result.update(chance(C))
    result.update(accuracy_metrics(scores, labels, data.classes))
    result["seconds"] = contrastive_seconds
    if probe:
        t3 = time.perf_counter()
        feats = torch.stack([parts[p]["emb"][j] for _, p, j in order])
        result["linear_probe"] = {**linear_probe(feats, labels, C), "seconds": time.perf_counter() - t3}
    if itm_note is not None:
        result["itm"] = {"skipped": itm_note}
    else:
        itm_scores = torch.stack([parts[p]["itm"][j] for _, p, j in order])
        result["itm"] = {"k": k, "score": mode, "prompts": how, **accuracy_metrics(itm_scores, labels, data.classes),
                         "seconds": itm_seconds}
    return result


def resolve_templates(cfg, cli_templates: list[str] | None) -> tuple[list[str] | None, str]:
    """The explicit template list (CLI first, then ``eval.classify_templates``) or None."""
    if cli_templates:
        return check_templates(read_templates(cli_templates), "--templates"), "command line"
    if cfg.eval.classify_templates:
        return check_templates(read_templates(list(cfg.eval.classify_templates)), "eval.classify_templates"), "config"
    return None, ""


def run_zero_shot(model, cfg, accelerator, tokenizer, path: str, *, templates: list[str] | None = None) -> dict:
    """Load ``path`` (``eval.classify_label_field``, ``eval.classify_max_images``) and classify
    it; every rank calls it. ``templates``: ``--templates`` values (None: the config's, the
    dataset's, the default set)."""
    data = load_classify_set(path, cfg.eval.classify_label_field, int(cfg.eval.classify_max_images))
    chosen, where = resolve_templates(cfg, templates)
    return zero_shot(model, cfg, accelerator, tokenizer, data, templates=chosen, templates_from=where or "config")


# ----------------------------------------------------------------------------- text output

def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def format_table(result: dict, max_classes: int = 20) -> str:
    """A short plain-text table of ``result`` (what ``mmpretrain eval --classify`` prints)."""
    lines = [f"zero-shot classification: {result['source']} ({result['num_images']} images, "
             f"{result['num_classes']} classes, {len(result['templates'])} templates from {result['templates_from']})"]
    rows = [("contrastive", result)]
    itm = result.get("itm") or {}
    if "top1" in itm:
        rows.append((f"ITM top-{itm['k']} ({itm['score']}, {itm['prompts']})", itm))
    w = max(len(n) for n, _ in rows + [("chance", None), ("linear probe (4-fold)", None)])
    lines.append(f"{'':{w}}  {'top-1':>6}  {'top-5':>6}  {'mean per-class':>14}")
    for name, r in rows:
        lines.append(f"{name:{w}}  {_fmt(r['top1']):>6}  {_fmt(r['top5']):>6}  {_fmt(r['mean_per_class']):>14}")
    lp = result.get("linear_probe") or {}
    if lp.get("top1") is not None:
        lines.append(f"{'linear probe (' + str(lp['folds']) + '-fold)':{w}}  {_fmt(lp['top1']):>6}  {'':>6}  {'':>14}")
    lines.append(f"{'chance':{w}}  {_fmt(result['chance_top1']):>6}  {_fmt(result['chance_top5']):>6}  "
                 f"{_fmt(result['chance_top1']):>14}")
    if "skipped" in itm:
        lines.append(f"ITM re-scoring skipped: {itm['skipped']}")
    if result["num_classes"] <= max_classes:
        cw = max(len(c) for c in result["classes"])
        head = f"{'class':{cw}}  {'n':>5}  {'top-1':>6}" + (f"  {'ITM top-1':>9}" if "top1" in itm else "")
        lines.append(head)
        for c in result["classes"]:
            pc = result["per_class"][c]
            line = f"{c:{cw}}  {pc['n']:>5}  {_fmt(pc['top1']):>6}"
            if "top1" in itm:
                line += f"  {_fmt(itm['per_class'][c]['top1']):>9}"
            lines.append(line)
    return "\n".join(lines)
