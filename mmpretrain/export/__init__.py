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
(``tests/unit/test_library_imports.py``).
"""

from mmpretrain.export.cli import export_checkpoint, main
from mmpretrain.export.format import (CKPT_FORMAT, CKPT_META, EXPORT_FORMAT, FORMAT, META_FILE, MODEL_KEYS,
                                      PREPROCESSING_KEYS, CheckpointError, ExportError, Loaded,
                                      find_latest_checkpoint, load_checkpoint, load_state_strict,
                                      read_checkpoint, read_export, read_meta, step_dir_name)
from mmpretrain.export.inference import Pretrained, load_pretrained
from mmpretrain.export.towers import TOWER_ATOL, export_image_tower, export_text_tower, unified_timm_state
from mmpretrain.export.verify import VERIFY_ATOL
from mmpretrain.export.vilt import export_itm, vilt_unsupported

__all__ = ["CKPT_FORMAT", "CKPT_META", "EXPORT_FORMAT", "FORMAT", "META_FILE", "MODEL_KEYS", "PREPROCESSING_KEYS",
           "TOWER_ATOL", "VERIFY_ATOL", "CheckpointError", "ExportError", "Loaded", "Pretrained", "export_checkpoint",
           "export_image_tower", "export_itm", "export_text_tower", "find_latest_checkpoint", "load_checkpoint",
           "load_pretrained", "load_state_strict", "main", "read_checkpoint", "read_export", "read_meta",
           "step_dir_name", "unified_timm_state", "vilt_unsupported"]
