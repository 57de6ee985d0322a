"""``OUT/README.md``: a model card in the Hub's format (YAML front matter + Markdown) with the
architecture, training data and steps, the eval metrics of the checkpoint's run (when the run
directory holds them) and the loading snippets for each library."""

from __future__ import annotations

import json
from pathlib import Path

METRIC_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall",
               "itm_mean_recall")


def run_metrics(ckpt: Path) -> tuple[dict, str] | None:
    """The eval metrics of the checkpoint's run: ``RUN/eval/step_N/metrics.json``, then
    ``RUN/eval/metrics.json``, then the last ``eval`` record of ``RUN/metrics.jsonl``."""
    run = ckpt.resolve().parent.parent
    for path in (run / "eval" / ckpt.name / "metrics.json", run / "eval" / "metrics.json"):
        try:
            return json.loads(path.read_text()), str(path)
        except (OSError, ValueError):
            continue
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("eval"), dict):
            return rec["eval"], f"{run / 'metrics.jsonl'} (step {rec.get('step')})"
    return None


def _architecture(cfg) -> str:
    m = cfg.model
    if m.arch == "unified":
        kind = "VLMo-style unified transformer with modality experts" if m.modality_experts else \
            "ViLT-style unified single-stream transformer"
        return (f"{kind}: width {m.width}, depth {m.depth}, {m.num_heads} heads, patch {m.patch_size}, "
                f"image {m.image_size}px, text up to {m.max_text_length} tokens, embedding {m.embed_dim}, "
                f"pool {m.pool}, ITM read-out {m.itm_readout}"
                + (f", fusion: {m.fusion_depth} block(s) over the unimodal outputs"
                   if getattr(m, "fusion_source", "inputs") == "towers" else ""))
    return (f"dual encoder: image tower {m.image_backbone}, BERT text tower (width {m.width}, depth {m.depth}, "
            f"{m.num_heads} heads), embedding {m.embed_dim}, ITM fusion {m.fusion}")


def write_model_card(out: Path, cfg, loaded, config: dict, name: str | None = None) -> None:
    """Write ``out/README.md``; ``name``: the directory name the snippets use (default ``out.name``)."""
    name = name or out.name
    found = run_metrics(Path(loaded.source))
    if found:
        metrics, where = found
        rows = "\n".join(f"| {k} | {metrics[k]:.2f} |" for k in METRIC_KEYS
                         if isinstance(metrics.get(k), (int, float)))
        metrics_md = f"From `{where}`:\n\n| metric | value |\n| --- | --- |\n{rows}\n"
    else:
        metrics_md = "No evaluation metrics were found beside the checkpoint (run `mmpretrain eval`).\n"
    notes = "\n".join(f"- **{k}**: {v}" for k, v in config.get("not_exported", {}).items())
    image_library = config["towers"].get("image_encoder", {}).get("library")
    has_img = image_library == "timm"  # small_cnn: transformers PoolFormer (no timm form)
    st_img = image_library is not None  # the sentence-transformers image route (both forms)
    st = config.get("sentence_transformers")
    tags = ["mmpretrain", "image-text-retrieval", "feature-extraction"] + (["sentence-transformers"] if st else [])
    front = "---\n" + "library_name: " + ("sentence-transformers" if st else "transformers") + "\n" + \
        "pipeline_tag: feature-extraction\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"
    snippets = ["```python\nfrom sentence_transformers import SentenceTransformer\n\n"
                f'model = SentenceTransformer("{name}")\n'
                'txt = model.encode(["a red circle left of a blue square"])   # = embed_texts\n'
                + ('img = model.encode([PIL.Image.open("photo.jpg")])               # = embed_images\n' if st_img else "")
                + "```\n"] if st else []
    snippets.append("```python\nimport torch, torch.nn.functional as F\nfrom safetensors.torch import load_file\n"
                    "from transformers import AutoModel, AutoTokenizer\n\n"
                    f'tok = AutoTokenizer.from_pretrained("{name}/text_encoder")\n'
                    f'enc = AutoModel.from_pretrained("{name}/text_encoder")\n'
                    'b = tok(["a red circle"], padding=True, return_tensors="pt")\n'
                    "h = enc(**b).last_hidden_state\n"
                    + ("pooled = h[:, 0]\n" if cfg.model.pool == "cls" else
                       'm = b["attention_mask"].unsqueeze(-1).float(); pooled = (h * m).sum(1) / m.sum(1)\n')
                    + f'w = load_file("{name}/text_encoder/text_projection.safetensors")["weight"]\n'
                    "txt = F.normalize(pooled @ w.T, dim=-1)\n```\n")
    if has_img:
        snippets.append("```python\nimport timm, torch.nn.functional as F\n\n"
                        f'vit = timm.create_model("local-dir:{name}/image_encoder", pretrained=True).eval()\n'
                        "tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=vit))\n"
                        'img = F.normalize(vit(tf(PIL.Image.open("photo.jpg").convert("RGB"))[None]), dim=-1)\n```\n')
    if image_library == "transformers":
        snippets.append("```python\nimport timm, torch.nn.functional as F\n"
                        "from transformers import AutoModelForImageClassification\n\n"
                        f'enc = AutoModelForImageClassification.from_pretrained("{name}/image_encoder").eval()\n'
                        "tf = timm.data.create_transform(**timm.data.resolve_data_config({}, "
                        "pretrained_cfg=enc.config.pretrained_cfg))\n"
                        'img = F.normalize(enc(pixel_values=tf(PIL.Image.open("photo.jpg").convert("RGB"))[None]).logits, '
                        "dim=-1)\n```\n")
    if (out / "itm").is_dir():
        snippets.append("```python\nfrom transformers import ViltForImageAndTextRetrieval\n\n"
                        f'itm = ViltForImageAndTextRetrieval.from_pretrained("{name}/itm")\n'
                        "p_match = itm(input_ids=b['input_ids'], attention_mask=b['attention_mask'],\n"
                        "              pixel_values=tf(PIL.Image.open(\"photo.jpg\").convert(\"RGB\"))[None]).logits.sigmoid()  # = score_pairs\n```\n")
    snippets.append("```python\nimport mmpretrain\n\n"
                    f'm = mmpretrain.load_pretrained("{name}")   # embed_images / embed_texts / score_pairs\n```\n')
    data = cfg.data
    accum_steps = cfg.train.grad_accum_steps
    accum = f", {accum_steps} micro-steps per optimizer step" if accum_steps > 1 else ""
    body = f"""
# {name}

Image-text retrieval model trained with mmpretrain ({cfg.model.arch}), exported by `mmpretrain export`.

## Architecture
{_architecture(cfg)}.

## Training
- data: `{data.train_shards}` (validation: `{data.val_shards}`)
- steps: {loaded.step}; global batch {data.global_batch_size} (per micro-step, all processes together){accum}
- losses: {cfg.loss.contrastive} (weight {cfg.loss.contrastive_weight}), ITM weight {cfg.loss.itm_weight},
  MLM weight {cfg.loss.mlm_weight}
- preprocessing: {data.image_size}px, shorter side resized (bicubic) then center crop, mean {list(data.mean)},
  std {list(data.std)}; text: up to {data.max_length} tokens

## Evaluation
{metrics_md}
## Files
- `text_encoder/`: {config['towers']['text_encoder']['class']} (`transformers.AutoModel`) + tokenizer
  (`model_max_length` {data.max_length}) + `text_projection.safetensors`
""" + ("- `image_encoder/`: timm model (`local-dir:`), also `transformers.AutoModel` (TimmWrapper) and\n"
       "  `AutoImageProcessor`; its `pretrained_cfg` is this run's preprocessing\n" if has_img else "") + \
        ("- `image_encoder/`: `transformers.AutoModelForImageClassification` (PoolFormer form of small_cnn),\n"
         "  `normalize(logits)` = image embedding; `config.json` `pretrained_cfg` is this run's preprocessing\n"
         "  for timm's transform, which gives the exact pixels (so does `AutoImageProcessor`: it is timm's\n"
         "  transform of that `pretrained_cfg`)\n" if image_library == "transformers" else "") + \
        ("- `itm/`: `transformers.ViltForImageAndTextRetrieval`; `sigmoid(logits)` = ITM match probability\n"
         if (out / "itm").is_dir() else "") + \
        ("- the directory itself: `SentenceTransformer(dir)` ("
         + ("text and image routes" if st_img else "text route only") + ")\n" if st else "") + \
        "- `model.safetensors`, `config.json`, `preprocessing.json`: `mmpretrain.load_pretrained(dir)`\n" + \
        ("\nNot exported:\n" + notes + "\n" if notes else "") + \
        ("\nPixels: timm's transform of the `pretrained_cfg` (shorter side resized, bicubic, then center crop) "
         "is mmpretrain's evaluation preprocessing, on any aspect ratio.\n") + \
        "\n## Usage\n" + "\n".join(snippets)
    (out / "README.md").write_text(front + body)
