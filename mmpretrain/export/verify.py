"""Check every standard-library form an export writes against the live model, before publishing.

The files are loaded back the way a user would, with the standard libraries only: timm
(``local-dir:`` + ``resolve_data_config`` + ``create_transform`` on PIL images; for ``small_cnn``
``AutoModelForImageClassification`` on timm's transform of its ``pretrained_cfg``, and its
``AutoImageProcessor``), transformers
(``AutoModel`` + the tokenizer with ``padding=True`` + the declared pooling/projection, and
``ViltForImageAndTextRetrieval``) and sentence-transformers (``SentenceTransformer(OUT)``), and
compared with ``embed_texts`` / ``embed_images`` / ``score_pairs`` of the live model within
``VERIFY_ATOL``. A difference is an ``ExportError``: the export is not published.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpretrain.export.format import ExportError

VERIFY_ATOL = 1e-5


def _close(what: str, got: torch.Tensor, want: torch.Tensor, diffs: dict) -> None:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        raise ExportError(f"export check failed: {what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = float((got - want).abs().max())
    diffs[what] = err
    if not err <= VERIFY_ATOL:
        raise ExportError(f"export check failed: {what}: max abs difference {err:.3g} > {VERIFY_ATOL}")


@torch.no_grad()
def verify_export(out: Path, model, tokenizer, preprocessing: dict, images: list, texts: list[str],
                  config: dict) -> dict[str, float]:
    """Load ``out``'s files with the standard libraries and compare; returns the max abs
    differences (also stored under ``config["verified"]``)."""
    from mmpretrain.export.inference import Pretrained

    live = Pretrained(model, tokenizer, config, preprocessing)
    want_txt = live.embed_texts(texts)
    want_img = live.embed_images(images)
    diffs: dict[str, float] = {}
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # load reports (TimmWrapper drops the timm head by design)
    try:  # ViLT draws its patch order from torch's RNG: a fixed seed keeps the measured diffs reproducible
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            _verify(out, live, tokenizer, preprocessing, images, texts, config, want_txt, want_img, diffs)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - a library that cannot load what was written: one line
        msg = " ".join(str(e).split())[:300]
        raise ExportError(f"export check failed: loading the written files: {type(e).__name__}: {msg}") from None
    finally:
        hf_logging.set_verbosity(level)
    config["verified"] = {"max_abs_diff": diffs, "atol": VERIFY_ATOL}
    return diffs


def _verify(out, live, tokenizer, preprocessing, images, texts, config, want_txt, want_img, diffs) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    if True:
        tok = AutoTokenizer.from_pretrained(str(out / "text_encoder"))
        if tok.model_max_length != int(preprocessing["max_length"]):
            raise ExportError(f"export check failed: tokenizer model_max_length {tok.model_max_length}")
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        hf = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
        h = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = h[:, 0] if config["towers"]["text_encoder"]["pool"] == "cls" else (h * m).sum(1) / m.sum(1)
        w = load_file(str(out / "text_encoder" / "text_projection.safetensors"))["weight"]
        _close("transformers text_encoder + pooling + projection vs embed_texts",
               F.normalize(pooled @ w.t(), dim=-1), want_txt, diffs)
        pixels = None
        image_library = config["towers"].get("image_encoder", {}).get("library")
        if image_library == "transformers":  # small_cnn: PoolFormerForImageClassification
            from timm.data import create_transform, resolve_data_config
            from transformers import AutoConfig, AutoModelForImageClassification

            d = str(out / "image_encoder")
            pf = AutoModelForImageClassification.from_pretrained(d).eval()
            tf = create_transform(**resolve_data_config({}, pretrained_cfg=AutoConfig.from_pretrained(d).pretrained_cfg))
            pixels = torch.stack([tf(im.convert("RGB")) for im in images])
            _close("timm transform of image_encoder pretrained_cfg vs our eval pixels", pixels, live.pixels(images), diffs)
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(d)
            _close("AutoImageProcessor of image_encoder vs our eval pixels",
                   proc([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"],
                   live.pixels(images), diffs)
            _close("transformers image_encoder normalize(logits) vs embed_images",
                   F.normalize(pf(pixel_values=pixels).logits, dim=-1), want_img, diffs)
        elif image_library == "timm":
            import timm
            from timm.data import create_transform, resolve_data_config

            tm = timm.create_model(f"local-dir:{out / 'image_encoder'}", pretrained=True).eval()
            tf = create_transform(**resolve_data_config({}, model=tm))
            pixels = torch.stack([tf(im.convert("RGB")) for im in images])
            _close("timm transform vs our eval pixels", pixels, live.pixels(images), diffs)
            _close("timm image_encoder vs embed_images", F.normalize(tm(pixels), dim=-1), want_img, diffs)
        if (out / "itm").is_dir():
            from transformers import ViltForImageAndTextRetrieval

            vilt = ViltForImageAndTextRetrieval.from_pretrained(str(out / "itm")).eval()
            pair_texts = [texts[i % len(texts)] for i in range(len(images))]  # one pair per image
            enc = tok(pair_texts, padding=True, truncation=True, return_tensors="pt")
            got = vilt(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=pixels).logits.reshape(-1).sigmoid()
            _close("ViltForImageAndTextRetrieval sigmoid(logits) vs score_pairs", got,
                   live.score_pairs(images, pair_texts), diffs)
        if config.get("sentence_transformers"):
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(out), device="cpu")
            _close("SentenceTransformer.encode(texts) vs embed_texts",
                   st.encode(texts, convert_to_tensor=True), want_txt, diffs)
            if image_library is not None:
                _close("SentenceTransformer.encode(images) vs embed_images",
                       st.encode(images, convert_to_tensor=True), want_img, diffs)
