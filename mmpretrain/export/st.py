"""``OUT/`` as a sentence-transformers model: ``SentenceTransformer(OUT).encode(texts)`` and
``.encode(pil_images)`` = ``embed_texts`` / ``embed_images``.

Layout (a ``Router`` picking the route by the input's modality; no weights are duplicated: the
routes' ``Transformer`` modules are the ``text_encoder/`` and ``image_encoder/`` directories)::

    modules.json                  [Router (.)]
    router_config.json            text:  text_encoder -> text_pooling -> text_projection -> normalize
                                  image: image_encoder [-> image_pooling] -> image_projection -> normalize
    text_encoder/                 transformers model + sentence_bert_config.json (+ tokenizer)
    text_pooling/                 Pooling (mean over non-padding tokens, or [CLS]: model.pool)
    text_projection/              Dense (no bias, identity activation) = the text projection
    image_encoder/                timm dir (TimmWrapper) + sentence_bert_config.json: pooler_output;
                                  small_cnn: the PoolFormer dir, last_hidden_state (a 4-D map that
                                  sentence-transformers flattens to tokens)
    image_pooling/                small_cnn only: Pooling (mean over the map's positions)
    image_projection/             Dense = the image projection (unified: image_proj; dual encoder:
                                  tower projection and image_proj folded, with bias; small_cnn:
                                  the first half of the [v; -v] channels, the projection being
                                  folded into the PoolFormer's last stage)
    normalize/                    Normalize (L2)
    config_sentence_transformers.json   similarity_fn_name "cosine"

sentence-transformers is imported here only (an optional dependency: ``pip install
mmpretrain[export]``); without it ``write_sentence_transformers`` returns the reason it could
not write the layout and the export notes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sentence_transformers_available() -> str | None:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return "sentence-transformers is not installed (pip install sentence-transformers)"
    return None


def _dense(in_f: int, projection: tuple[torch.Tensor, torch.Tensor | None]):
    from sentence_transformers.base.modules import Dense

    w, b = projection
    d = Dense(in_f, int(w.shape[0]), bias=b is not None, activation_function=None,
              init_weight=torch.nn.Parameter(w.clone()), init_bias=None if b is None else torch.nn.Parameter(b.clone()))
    return d


def write_sentence_transformers(out: Path, text: dict, image: dict | None, max_length: int) -> str | None:
    """Write the sentence-transformers files into ``out`` (whose ``text_encoder/`` and
    ``image_encoder/`` are already written). Returns None, or why the layout was not written."""
    why = sentence_transformers_available()
    if why:
        return why
    import warnings

    from sentence_transformers import __version__ as st_version
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            types, structure = _write_modules(out, text, image, max_length, Normalize, Transformer, Pooling)
    finally:
        hf_logging.set_verbosity(level)
    _write_router(out, types, structure, st_version)
    return None


def _write_modules(out, text, image, max_length, Normalize, Transformer, Pooling):
    structure: dict[str, list[str]] = {}
    modules: dict[str, object] = {}
    txt = Transformer(str(out / "text_encoder"), max_seq_length=int(max_length))
    modules["text_encoder"] = txt
    modules["text_pooling"] = Pooling(int(text["_features"]), pooling_mode="cls" if text["pool"] == "cls" else "mean")
    modules["text_projection"] = _dense(int(text["_features"]), text["_projection"])
    modules["normalize"] = Normalize()
    structure["text"] = ["text_encoder", "text_pooling", "text_projection", "normalize"]
    if image is not None:
        route = image.get("_st") or {"method_output_name": "pooler_output", "pooling": None}
        pooled = route["pooling"] is not None  # small_cnn: the 4-D map, flattened to tokens by ST, then a mean
        img = Transformer(str(out / "image_encoder"),
                          modality_config={"image": {"method": "forward",
                                                     "method_output_name": route["method_output_name"]}},
                          module_output_name="token_embeddings" if pooled else "sentence_embedding")
        modules["image_encoder"] = img
        structure["image"] = ["image_encoder"]
        if pooled:
            modules["image_pooling"] = Pooling(int(image["_features"]), pooling_mode=route["pooling"])
            structure["image"].append("image_pooling")
        modules["image_projection"] = _dense(int(image["_features"]), image["_projection"])
        structure["image"] += ["image_projection", "normalize"]
    for name, mod in modules.items():
        (out / name).mkdir(exist_ok=True)
        if isinstance(mod, Transformer):  # the model files are already there: add only ST's own
            mod.processor.save_pretrained(str(out / name))
            mod.save_config(str(out / name))
        else:
            mod.save(str(out / name), safe_serialization=True)
    return {name: f"{type(m).__module__}.{type(m).__name__}" for name, m in modules.items()}, structure


def _write_router(out: Path, types: dict, structure: dict, st_version: str) -> None:
    router = {"types": types, "structure": structure,
              "parameters": {"default_route": None, "allow_empty_key": True, "route_mappings": {}}}
    (out / "router_config.json").write_text(json.dumps(router, indent=4) + "\n")
    (out / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.router.Router"}], indent=2) + "\n")
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": {"sentence_transformers": st_version}, "model_type": "SentenceTransformer",
         "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2) + "\n")
