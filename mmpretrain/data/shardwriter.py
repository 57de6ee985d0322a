"""Writing WebDataset shards and the shard manifest, atomically.

A shard is written as ``<file>.tar.tmp`` and renamed to ``<file>.tar`` only when it is complete,
so a tar that exists under its final name is always whole. The manifest (``manifest.json``, see
docs/ARCHITECTURE.md) is rewritten the same way after every completed shard, and lists a shard
only once its tar has been renamed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

MANIFEST_FORMAT = "mmpretrain-shards/1"
MANIFEST_NAME = "manifest.json"


class ShardsError(ValueError):
    """Bad input or settings for a shard command; the message is one line naming the file/field."""


def shard_name(prefix: str, index: int) -> str:
    """``train-000012.tar`` for prefix ``train`` and index 12."""
    return f"{prefix}-{index:06d}.tar"


class TarShard:
    """One shard being written: ``add(key, {ext: bytes})``, then ``commit()`` (or ``abort()``).

    Entries get a fixed mtime/owner so the same samples give byte-identical tars.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def commit(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "TarShard":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def sample_fields(image: bytes, image_ext: str, caption: str, meta: dict) -> dict[str, bytes]:
    """The fields of one sample in the order they are written: image, ``txt``, ``json``."""
    return {
        image_ext: image,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShardsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ShardsError(f"{path}: not an mmpretrain shard manifest (format != {MANIFEST_FORMAT!r})")
    return manifest


def new_manifest(created_by: str) -> dict:
    return {"format": MANIFEST_FORMAT, "splits": {}, "skipped": {}, "created_by": created_by}


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Atomically (tmp + rename) write the manifest; the top-level ``skipped`` is the sum of the
    splits' own ``skipped`` counts so rebuilding one split never double counts."""
    total: dict[str, int] = {}
    for split in manifest.get("splits", {}).values():
        split["num_samples"] = sum(int(s["num_samples"]) for s in split.get("shards", []))
        for reason, count in split.get("skipped", {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    manifest["skipped"] = dict(sorted(total.items()))
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def remove_stale_shards(out_dir: str | os.PathLike, prefix: str, keep: set[str]) -> None:
    """Delete ``<prefix>-NNNNNN.tar[.tmp]`` files not in ``keep`` (left by an earlier, larger run)
    so a glob such as ``train-*.tar`` never picks up shards from another run."""
    for path in Path(out_dir).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if path.name.endswith((".tar", ".tar.tmp")) and path.name not in keep:
            path.unlink()


def progress_bar(total: int, desc: str, unit: str = "sample"):
    """A tqdm bar on an interactive terminal; silent when stderr is not a tty or under CI."""
    import sys

    from tqdm import tqdm

    disable = not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
