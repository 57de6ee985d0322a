"""Inference on an exported model: ``load_pretrained(path)`` -> ``Pretrained``.

No trainer, optimizer, Accelerate or GPU needed: this module imports only the export format
reader, the model and the data transforms/tokenizer (``tests/unit/test_library_imports.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmpretrain.export.format import META_FILE, ExportError, read_export


def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from mmpretrain.data.tokenizer import tokenize

    return tokenize(tokenizer, list(texts), max_length)


class Pretrained:
    """Inference on an exported model: no trainer, optimizer or GPU needed.

    - ``embed_images(images)``: PIL images or image file paths (``str`` / ``pathlib.Path``;
      resized/cropped as in evaluation) or tensors
      (uint8 ``[3, H, W]``/``[B, 3, H, W]`` at the model's size, or already-normalised floats)
      -> L2-normalised ``[B, E]``.
    - ``embed_texts(texts)`` -> L2-normalised ``[B, E]``.
    - ``score_pairs(images, texts)`` -> ITM match probability ``[B]`` of each (image i, text i).
    """

    def __init__(self, model, tokenizer, config: dict, preprocessing: dict, device="cpu"):
        self.model, self.tokenizer, self.config, self.preprocessing = model, tokenizer, config, preprocessing
        self.device = torch.device(device)

    def pixels(self, images) -> torch.Tensor:
        """Normalised float ``[B, 3, S, S]`` on the model's device."""
        from mmpretrain.data import transforms as T

        p = self.preprocessing
        size = int(p["image_size"])
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            if batch.is_floating_point():
                return batch.to(self.device, torch.float32)
        else:
            tensors = []
            for im in images:
                if isinstance(im, torch.Tensor):
                    tensors.append(im)
                    continue
                if isinstance(im, (str, Path)):
                    im = _open_image(im)
                im = im.convert("RGB")
                tensors.append(T.to_uint8_chw(T.resize_center_crop(im, size)))  # the eval rule
            if tensors and all(t.is_floating_point() for t in tensors):
                return torch.stack(tensors).to(self.device, torch.float32)
            batch = torch.stack(tensors)
        if tuple(batch.shape[-2:]) != (size, size):
            raise ValueError(f"image tensors must be {size}x{size} (got {tuple(batch.shape[-2:])}); pass PIL images to resize")
        return T.normalize(batch.to(self.device), p["mean"], p["std"], torch.float32)

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = _tokenize(self.tokenizer, list(texts), int(self.preprocessing["max_length"]))
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return self.model.encode_image(self.pixels(images))[1].float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(*self.tokens(texts))[1].float()

    @torch.no_grad()
    def score_pairs(self, images, texts: list[str]) -> torch.Tensor:
        """ITM match probability of each pair (``images[i]``, ``texts[i]``): float ``[B]`` in [0, 1].

        ``images`` takes what ``embed_images`` takes (PIL images, file paths or tensors) and must
        hold as many images as ``texts`` holds captions; the pairs are scored one to one (zip), not
        all against all — for a ranking, score each candidate text with its image repeated. The
        score is the softmax "match" class of the model's ITM head over one fused image-text pass
        (for the default model, fused over the towers; see docs/model.md), so it ranks only as
        well as that head learned to (README, "Where ITM stands")."""
        px = self.pixels(images)
        if px.shape[0] != len(texts):
            raise ValueError(f"score_pairs: {px.shape[0]} images but {len(texts)} texts")
        return self.model.itm_logits(px, *self.tokens(texts)).float().softmax(dim=-1)[:, 1]


def _open_image(path: str | Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:  # missing file, not an image (PIL.UnidentifiedImageError)
        raise ValueError(f"embed_images: cannot read image {path}: {e}") from None


def load_pretrained(path: str | Path, device: str = "cpu") -> Pretrained:
    """Rebuild an export directory (``mmpretrain export``) for inference.

    A training checkpoint (or a run directory) is not an export: that is an ``ExportError`` that
    names the ``mmpretrain export`` command to run first."""
    path = Path(path)
    if not (path / "config.json").is_file() and ((path / META_FILE).is_file() or (path / "checkpoints").is_dir()):
        kind = "a training checkpoint" if (path / META_FILE).is_file() else "a training run directory"
        raise ExportError(f"{path} is {kind}, not an export; export it first with "
                          f"`mmpretrain export --checkpoint {path} --out DIR`, then load_pretrained(DIR)")
    model, tokenizer, config, preprocessing = read_export(path, device)
    return Pretrained(model, tokenizer, config, preprocessing, device)
