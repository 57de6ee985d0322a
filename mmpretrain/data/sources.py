"""Listing real image-caption sources in a deterministic order, without decoding any image.

Every ``list_*`` function returns a :class:`Listing`: the source images in a fixed order (each
with one or more captions and its ``image_id``) and the samples it had to drop already, counted by
reason (``missing_caption``, ``missing_image``, ``bad_record``, ``unreadable_tar``). The same
input always gives the same listing, which is what lets an interrupted build resume: shard ``i``
holds samples ``[i*K, (i+1)*K)`` of the flattened listing.

Malformed input as a whole (unknown columns, missing top-level JSON fields, no file) raises
:class:`ShardsError` with a one-line message naming the file and the field.
"""

from __future__ import annotations

import csv
import io
import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mmpretrain.data.shardwriter import ShardsError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # preference order in a sample
TAR_CAPTION_EXTS = ("txt", "caption", "text")
CSV_IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path")
CSV_CAPTION_COLUMNS = ("caption", "text", "txt", "title")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
MAX_SKIP_EXAMPLES = 10  # skipped samples named (file and why) in the manifest and the build's output


@dataclass
class ImageRef:
    """Where an image's bytes are: a file, or a byte range of a tar member."""

    path: str
    offset: int = -1  # >= 0: the member's data starts here inside the tar at ``path``
    size: int = -1
    member: str = ""

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclass
class SourceImage:
    ref: ImageRef
    image_id: str | int
    captions: list[str]
    meta: dict = field(default_factory=dict)  # extra metadata carried into the sample json


@dataclass
class Listing:
    images: list[SourceImage] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)  # "reason: file: why", the first MAX_SKIP_EXAMPLES

    def skip(self, reason: str, count: int = 1, detail: str = "") -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            if detail and len(self.skipped_files) < MAX_SKIP_EXAMPLES:
                self.skipped_files.append(f"{reason}: {detail}")

    def add(self, ref: ImageRef, image_id, captions: list[str], meta: dict, check_file: bool = True) -> None:
        captions = [c for c in (_clean(c) for c in captions) if c]
        if not captions:
            self.skip("missing_caption", 1, f"{ref.describe()}: no caption")
        elif check_file and not os.path.isfile(ref.path):
            self.skip("missing_image", len(captions), f"{ref.path}: no such file")
        else:
            self.images.append(SourceImage(ref, image_id, captions, meta))


def _clean(caption) -> str:
    return " ".join(caption.split()) if isinstance(caption, str) else ""


def _require(path: str, kind: str = "file") -> Path:
    p = Path(path)
    if kind == "file" and not p.is_file():
        raise ShardsError(f"{path}: no such file")
    if kind == "dir" and not p.is_dir():
        raise ShardsError(f"{path}: no such directory")
    return p


def _image_root(input_path: Path, images: str | None) -> Path:
    if images is None:
        return input_path.parent
    return _require(images, "dir")


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ShardsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ShardsError(f"{path}: not UTF-8 text") from None


# ------------------------------------------------------------------------------------- folder
def list_folder(input_path: str) -> Listing:
    """Images under a directory (recursively, sorted); caption = the same-stem ``.txt`` file."""
    root = _require(input_path, "dir")
    listing = Listing()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ShardsError(f"{input_path}: no image files ({', '.join(IMAGE_EXTS)}) in this directory")
    for path in files:
        rel = path.relative_to(root).as_posix()
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
        listing.add(ImageRef(str(path)), rel.rsplit(".", 1)[0], [caption], {"file": rel})
    return listing


# ---------------------------------------------------------------------------------- csv/jsonl
def _pick_column(fieldnames: list[str], options: tuple[str, ...], path: Path, what: str) -> str:
    lowered = {name.strip().lower(): name for name in fieldnames if name}
    for option in options:
        if option in lowered:
            return lowered[option]
    found = ", ".join(fieldnames) or "nothing"
    raise ShardsError(
        f"{path}: no {what} column in the header row (expected one of {', '.join(options)}; found {found}); "
        "the first row must name the columns, e.g. 'image,caption'"
    )


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM dropped); bad bytes: ``ShardsError`` naming the line."""
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = err.start
        line = data[:start].count(b"\n") + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ShardsError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[start]:02x} at column {column}); "
                          "re-encode the file as UTF-8") from None


CSV_EXPECTED = (f"a .csv/.tsv file whose header row names an image column ({', '.join(CSV_IMAGE_COLUMNS)}) "
                f"and a caption column ({', '.join(CSV_CAPTION_COLUMNS)}), e.g. 'image,caption' then rows "
                "'photos/cat.jpg,a cat on a sofa' (image paths relative to the csv's folder or --images)")
JSONL_EXPECTED = ('a .jsonl file, one object per line: {"image": "photos/cat.jpg", "caption": "a cat on a sofa"} '
                  "(image paths relative to the file's folder or --images)")


def _require_table(input_path: str, fmt: str, expected: str, suffixes: tuple[str, ...]) -> Path:
    """The --input of --format csv/jsonl: a file; a directory or a missing path says what was expected."""
    p = Path(input_path)
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted(x.name for x in p.iterdir() if x.suffix.lower() in suffixes)
        hint = (f"; here: {', '.join(found[:5])}" if found else
                "; it holds no such file (images with same-name .txt captions: --format folder)")
        raise ShardsError(f"{input_path}: a directory; --format {fmt} --input expects {expected}{hint}")
    raise ShardsError(f"{input_path}: no such file; --format {fmt} --input expects {expected}")


def list_csv(input_path: str, images: str | None = None) -> Listing:
    """CSV/TSV with a header row naming an image column and a caption column."""
    path = _require_table(input_path, "csv", CSV_EXPECTED, (".csv", ".tsv"))
    root = _image_root(path, images)
    listing = Listing()
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        fieldnames = list(reader.fieldnames or [])
        image_col = _pick_column(fieldnames, CSV_IMAGE_COLUMNS, path, "image")
        caption_col = _pick_column(fieldnames, CSV_CAPTION_COLUMNS, path, "caption")
        for row in reader:
            image = (row.get(image_col) or "").strip()
            if None in row or not image:  # too many fields / no image cell
                where = f"{path}:{reader.line_num}"
                if None in row:
                    listing.skip("bad_record", 1, f"{where}: more fields than the {len(fieldnames)} of the header")
                else:
                    listing.skip("missing_image", 1, f"{where}: empty '{image_col}' cell")
                continue
            listing.add(ImageRef(str(root / image)), image, [row.get(caption_col) or ""], {"file": image})
    return listing


def list_jsonl(input_path: str, images: str | None = None) -> Listing:
    """One JSON object per line: ``{"image": ..., "caption": ...}`` (``caption`` may be a list;
    an ``image_id`` field is kept, otherwise the image path is the id)."""
    path = _require_table(input_path, "jsonl", JSONL_EXPECTED, (".jsonl", ".json"))
    root = _image_root(path, images)
    listing = Listing()
    seen_image = seen_caption = False
    with io.StringIO(_read_text(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ShardsError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ShardsError(f"{path}:{lineno}: expected a JSON object per line")
            image = record.get("image")
            captions = record.get("caption", record.get("captions"))
            seen_image |= "image" in record
            seen_caption |= captions is not None
            if not isinstance(image, str) or not image.strip():
                listing.skip("missing_image", 1, f"{path}:{lineno}: no 'image' path")
                continue
            captions = captions if isinstance(captions, list) else [captions]
            image_id = record.get("image_id", image)
            listing.add(ImageRef(str(root / image)), image_id, captions, {"file": image})
    if not seen_image:
        raise ShardsError(f"{path}: no record has an 'image' field")
    if not seen_caption:
        raise ShardsError(f"{path}: no record has a 'caption' field")
    return listing


# --------------------------------------------------------------------------------------- coco
def list_coco(input_path: str, images: str | None = None) -> Listing:
    """COCO captions json (``images[].id/file_name``, ``annotations[].image_id/caption``): one
    sample per caption, sharing the COCO image id; images sorted by id, captions by annotation id."""
    path = _require(input_path)
    root = _image_root(path, images)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ShardsError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ShardsError(f"{path}: missing '{key}' list (is this a COCO captions file?)")
    files: dict = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ShardsError(f"{path}: images[{i}] lacks 'id' or 'file_name'")
        files[image["id"]] = image["file_name"]
    captions: dict = {}
    listing = Listing()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ShardsError(f"{path}: annotations[{i}] lacks 'image_id' or 'caption'")
        if ann["image_id"] not in files:
            listing.skip("missing_image", 1, f"{path}: annotations[{i}]: image_id {ann['image_id']!r} not in 'images'")
            continue
        captions.setdefault(ann["image_id"], []).append((ann.get("id", i), ann["caption"]))
    for image_id in sorted(files, key=lambda x: (str(type(x)), x)):
        caps = [c for _, c in sorted(captions.get(image_id, []), key=lambda t: t[0])]
        listing.add(ImageRef(str(root / files[image_id])), image_id, caps, {"file": files[image_id]})
    return listing


# ---------------------------------------------------------------------------- karpathy/flickr
def list_karpathy(input_path: str, images: str | None = None, split: str | None = None) -> Listing:
    """Karpathy split json (Flickr30K / COCO / Flickr8K): ``images[].filename`` (+ ``filepath``),
    ``sentences[].raw``, ``split``; ``split`` keeps only ``train``/``val``/``test``/``restval``
    (comma-separated). image_id = ``cocoid`` if present, else ``imgid``, else the filename."""
    path = _require(input_path)
    root = _image_root(path, images)
    wanted = None
    if split:
        wanted = {s.strip() for s in split.split(",") if s.strip()}
        unknown = sorted(wanted - set(KARPATHY_SPLITS))
        if unknown:
            raise ShardsError(f"--split: unknown split {unknown[0]!r} (choose from {', '.join(KARPATHY_SPLITS)})")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ShardsError(f"{path}: missing 'images' list (is this a Karpathy split file?)")
    listing = Listing()
    source = data.get("dataset") if isinstance(data.get("dataset"), str) else "flickr30k"
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "filename" not in image:
            raise ShardsError(f"{path}: images[{i}] lacks 'filename'")
        if wanted is not None and image.get("split") not in wanted:
            continue
        rel = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        image_id = image.get("cocoid", image.get("imgid", rel))
        caps = [s.get("raw", "") for s in image.get("sentences", []) if isinstance(s, dict)]
        meta = {"file": rel, "split": image.get("split"), "source": source}
        listing.add(ImageRef(str(root / rel)), image_id, caps, meta)
    return listing


# -------------------------------------------------------------------------------- webdataset
def expand_tar_inputs(pattern: str) -> list[str]:
    """A directory (its ``*.tar``), a brace pattern (``a-{000..009}.tar``) and/or a glob."""
    if os.path.isdir(pattern):
        files = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        if not files:
            raise ShardsError(f"{pattern}: no .tar files in this directory")
        return files
    import braceexpand

    files: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.isfile(item) else [])
        if not matches:
            raise ShardsError(f"{item}: no such file")
        files += [m for m in matches if m not in files]
    return files


_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's key/extension split


def list_webdataset(input_pattern: str) -> Listing:
    """Samples of existing WebDataset/img2dataset tars in order (image + txt + optional json).

    Only the small txt/json members are read here; images are referenced by byte range. The
    sample json is kept (e.g. img2dataset's url); ``image_id`` comes from it when present, else
    from img2dataset's ``key``, else from the sample key.
    """
    listing = Listing()
    for tar_path in expand_tar_inputs(input_pattern):
        try:
            with tarfile.open(tar_path, "r:") as tar:
                groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
                for member in tar:
                    m = _KEY_RE.match(member.name)
                    if not member.isfile() or not m:
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}))
                    groups[-1][1][ext] = member
                for key, members in groups:
                    _add_tar_sample(listing, tar, tar_path, key, members)
        except (tarfile.TarError, OSError, EOFError) as err:
            listing.skip("unreadable_tar", 1, f"{tar_path}: {err}")
    if not listing.images and not listing.skipped:
        raise ShardsError(f"{input_pattern}: the tar files hold no samples")
    return listing


def _add_tar_sample(listing: Listing, tar: tarfile.TarFile, tar_path: str, key: str, members: dict) -> None:
    image_ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
    caption_ext = next((e for e in TAR_CAPTION_EXTS if e in members), None)
    caption = tar.extractfile(members[caption_ext]).read().decode("utf-8", "replace") if caption_ext else ""
    if image_ext is None:
        reason = "missing_image" if _clean(caption) else "missing_caption"
        listing.skip(reason, 1, f"{tar_path}:{key}: no image member ({', '.join(sorted(members))})")
        return
    meta: dict = {}
    if "json" in members:
        try:
            loaded = json.loads(tar.extractfile(members["json"]).read().decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    if isinstance(meta.get("status"), str) and meta["status"] != "success":  # img2dataset: failed_to_download, ...
        listing.skip("failed_download", 1, f"{tar_path}:{key}: img2dataset status {meta['status']!r}")
        return
    short_key = key.rsplit("/", 1)[-1]
    image_id = meta.get("image_id", meta.get("key", short_key))
    member = members[image_ext]
    ref = ImageRef(tar_path, member.offset_data, member.size, member.name)
    meta = {**meta, "orig_key": key, "file": f"{os.path.basename(tar_path)}:{member.name}"}
    listing.add(ref, image_id, [caption], meta, check_file=False)
