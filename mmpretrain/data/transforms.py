"""Image decoding and geometry in loader workers (uint8 out); normalisation on the device.

* ``open_image`` / ``check_image_header`` parse only the image header (no pixel decode) and
  reject images whose pixel count is above ``max_image_pixels`` (decompression bombs) or whose
  header is not an image at all; ``decode_and_crop`` runs that check on the same parse it then
  decodes.
* ``load_image`` decodes to RGB. JPEGs use libjpeg's DCT scaling (``Image.draft``) to decode
  directly at the smallest power-of-two reduction that still covers the crop at the target
  resolution, which is the bulk of the decode speed-up for large photos.
* ``eval_transform`` / ``resize_center_crop``: the standard eval geometry, exactly torchvision's
  ``Resize(size, BICUBIC) + CenterCrop(size)`` on PIL (timm's ``create_transform`` for
  ``crop_pct=1.0, crop_mode='center'``): the shorter side to ``size``, the longer to
  ``int(size * long / short)``, then the centred ``size`` x ``size`` crop at offsets
  ``int(round((n - size) / 2))``. The image is decoded at full resolution (no JPEG DCT scaling),
  as PIL does for timm, so an export's ``pretrained_cfg`` reproduces these pixels exactly,
  non-square images included. On square images this is the whole image resized once (what the
  earlier centre-crop-then-resize rule gave too).
* ``train_transform``: random-resized-crop (torchvision's algorithm: area ``scale`` — default
  (0.9, 1.0), ``data.train_crop_scale`` — ratio (3/4, 4/3), 10 tries then center fallback)
  seeded per sample, so a sample gets the same crop whatever worker or position it lands in.
  The scale keeps nearly the whole image because image-text captions describe the whole image:
  the synthetic captions name every object and where it is ("top left", "left of"), so a crop
  that keeps 8 % of the image (torchvision's default, made for labels that survive cropping)
  makes the caption false. No horizontal flip either: captions name left/right.
* ``normalize(pixels_uint8, mean, std, dtype)``: ``(x / 255 - mean) / std`` computed in fp32 on
  the tensor's device, then cast — the numbers of torchvision ``Normalize`` on ``ToTensor``.
"""

from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image


DEFAULT_CROP_SCALE = (0.9, 1.0)
"""Area range of the random-resized training crop (open_clip's default)."""


class BadSample(Exception):
    """A sample the loader skips; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _raise_pil_limit(max_pixels: int) -> None:
    # Our own guard replaces PIL's decompression-bomb check (which would fire at 2x its default).
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels * 2 > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels * 2


ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white, in the loader and in ``shards build`` alike."""


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, name of the conversion or None): palette, alpha (composited over
    ``ALPHA_BACKGROUND``), 16-bit and float grayscale (scaled to 8 bit, not saturated), CMYK,
    grayscale. The one conversion of the loader and of ``shards build``."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        if "transparency" not in image.info:
            return image.convert("RGB"), "palette"
        image, mode = image.convert("RGBA"), "P+alpha"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out, "palette" if mode == "P+alpha" else "alpha"
    if mode.startswith("I") or mode == "F":  # 16-bit / 32-bit integer or float grayscale
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        elif mode == "F":
            arr = arr * (255.0 / max(float(arr.max(initial=0)), 1e-12)) if arr.max(initial=0) > 1.0 else arr * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return gray.convert("RGB"), "16bit" if mode.startswith("I") else "float"
    if mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    if mode in ("1", "L"):
        return image.convert("RGB"), "grayscale"
    return image.convert("RGB"), mode.lower()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and apply the pixel-count guard. Raises ``BadSample``."""
    if not data:
        raise BadSample("missing_image", "empty image bytes")
    _raise_pil_limit(max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:  # its message names an io.BytesIO object, not the data
        raise BadSample("corrupt_image", f"not an image format PIL knows ({len(data)} bytes, starting "
                                         f"{data[:8]!r})") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt image
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadSample("corrupt_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise BadSample("image_too_large", f"{w}x{h} = {w * h} pixels > max_image_pixels={max_pixels}")
    return img


def check_image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header; raises ``BadSample`` (corrupt / too large)."""
    return open_image(data, max_pixels).size


def center_box(w: int, h: int) -> tuple[float, float, float, float]:
    s = min(w, h)
    left, top = (w - s) / 2.0, (h - s) / 2.0
    return (left, top, left + s, top + s)


def random_resized_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0),
                       ratio=(3.0 / 4.0, 4.0 / 3.0)) -> tuple[float, float, float, float]:
    """torchvision ``RandomResizedCrop.get_params`` with a local RNG."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return (float(left), float(top), float(left + cw), float(top + ch))
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return (float(left), float(top), float(left + cw), float(top + ch))


def load_image(img: Image.Image, max_pixels: int, box=None, size: int | None = None) -> tuple[Image.Image, tuple]:
    """Decode an opened image to RGB. With ``box`` (crop in original pixels) and ``size``, JPEG
    decoding is reduced (DCT scaling) as far as the box still has >= ``size`` pixels per side;
    returns the image and the box in the decoded image's coordinates."""
    w0, h0 = img.size
    if box is None:
        box = (0.0, 0.0, float(w0), float(h0))
    try:
        if size is not None and img.format == "JPEG":
            bw, bh = box[2] - box[0], box[3] - box[1]
            f = size / max(1e-6, min(bw, bh))
            if f < 0.5:
                img.draft("RGB", (max(1, math.ceil(w0 * f)), max(1, math.ceil(h0 * f))))
        if img.mode != "RGB":
            img = to_rgb(img)[0]  # 16-bit scaled, alpha over ALPHA_BACKGROUND (as shards build)
        else:
            img.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if (w, h) != (w0, h0):
        sx, sy = w / w0, h / h0
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img, box


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def crop_box(w: int, h: int, train: bool, crop: str, seed: int | None, scale=DEFAULT_CROP_SCALE):
    """The crop box (original pixels) a training sample gets (``random_resized``; otherwise the
    centre square, which ``resize_center_crop`` reproduces on square images)."""
    if train and crop == "random_resized":
        return random_resized_box(w, h, random.Random(seed), scale=tuple(scale))
    return center_box(w, h)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image, the same
    arithmetic (the eval rule; see the module docstring)."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) == (size, size):
        return img
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_and_crop_hwc(data: bytes, size: int, *, max_pixels: int, train: bool = False,
                        crop: str = "random_resized", seed: int | None = None,
                        scale=DEFAULT_CROP_SCALE) -> np.ndarray:
    """Bytes -> uint8 numpy ``[size, size, 3]``: header + pixel guard, then decode (one parse).
    Evaluation (``train=False``) is ``resize_center_crop`` of the fully decoded image; training
    resamples its crop box once, from a JPEG decoded at reduced DCT scale where that still covers
    it. Raises ``BadSample`` for corrupt/oversized images."""
    img = open_image(data, max_pixels)
    if not train:
        img = load_image(img, max_pixels)[0]
        return np.asarray(resize_center_crop(img, size), dtype=np.uint8)
    box = crop_box(*img.size, train, crop, seed, scale)
    img, box = load_image(img, max_pixels, box, size)
    out = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def decode_and_crop(data: bytes, size: int, *, max_pixels: int, train: bool = False,
                    crop: str = "random_resized", seed: int | None = None,
                    scale=DEFAULT_CROP_SCALE) -> torch.Tensor:
    """Bytes -> uint8 ``[3, size, size]`` (see ``decode_and_crop_hwc``)."""
    arr = decode_and_crop_hwc(data, size, max_pixels=max_pixels, train=train, crop=crop, seed=seed,
                              scale=scale)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def stack_chw(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> ``[B, 3, H, W]`` uint8 (one transposing copy into the batch)."""
    h, w, c = arrays[0].shape
    out = torch.empty((len(arrays), c, h, w), dtype=torch.uint8)
    dst = out.numpy()
    for i, a in enumerate(arrays):  # numpy copy: no torch intra-op threads in the loop
        dst[i] = a.transpose(2, 0, 1)
    return out


def eval_transform(data: bytes, size: int, max_pixels: int = 50_000_000) -> torch.Tensor:
    return decode_and_crop(data, size, max_pixels=max_pixels, train=False)


def train_transform(data: bytes, size: int, seed: int, max_pixels: int = 50_000_000,
                    crop: str = "random_resized", scale=DEFAULT_CROP_SCALE) -> torch.Tensor:
    return decode_and_crop(data, size, max_pixels=max_pixels, train=True, crop=crop, seed=seed, scale=scale)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> ``dtype`` ``(x/255 - mean) / std`` on ``pixels.device``."""
    x = pixels.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s).to(dtype)
