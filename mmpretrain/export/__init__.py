"""Export: checkpoints -> directories that standard libraries load, and inference on them.

- ``format``: the reader of checkpoints and exports (``read_meta``, ``read_checkpoint``,
  ``read_export``, the one ``load_checkpoint``), with the format constants.
- ``towers``: text tower for ``transformers`` (``RobertaPreLayerNormModel`` for the unified model,
  ``BertModel`` for the dual encoder), image tower for ``timm`` with the run's ``pretrained_cfg``.
- ``vilt``: ITM as ``transformers.ViltForImageAndTextRetrieval`` (unified, no experts, text [CLS]).
- ``st``: the export directory as a sentence-transformers model (Router: text and image routes).
- ``verify``: every written form loaded back with the standard libraries and compared (1e-5).
- ``card``: the Hub-format model card ``README.md``.
- ``inference``: ``load_pretrained(path)`` -> ``Pretrained`` (embed images/texts, score pairs).
- ``cli``: ``mmpretrain export`` (``export_checkpoint``, ``main(argv)``).

Library code: nothing here imports the trainer, the ``mmpretrain`` CLI or Accelerate
(``tests/unit/test_library_imports.py``). The names below are imported on first use
(``mmpretrain export --help`` parses its arguments without importing torch).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "export_checkpoint": "cli", "main": "cli",
    **{name: "format" for name in ("CKPT_FORMAT", "CKPT_META", "EXPORT_FORMAT", "FORMAT", "META_FILE", "MODEL_KEYS",
                                   "PREPROCESSING_KEYS", "CheckpointError", "ExportError", "Loaded",
                                   "find_latest_checkpoint", "load_checkpoint", "load_state_strict",
                                   "read_checkpoint", "read_export", "read_meta", "step_dir_name")},
    "Pretrained": "inference", "load_pretrained": "inference",
    "TOWER_ATOL": "towers", "export_image_tower": "towers", "export_text_tower": "towers",
    "unified_timm_state": "towers",
    "VERIFY_ATOL": "verify",
    "export_itm": "vilt", "vilt_unsupported": "vilt",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mmpretrain.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmpretrain.export.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
