"""Models: ``build_model(model_cfg, loss_cfg, vocab_size) -> PretrainModel``.

- ``pretrain.py``: ``PretrainModel`` (backbone + logit scale + losses; the Model contract of
  docs/ARCHITECTURE.md), ``build_model``, ``build_model_from_dict``.
- ``unified.py`` (the default backbone), ``dual_encoder.py``, ``layers.py``: the backbones.
- ``pretrained.py``: ``apply_pretrained(model, cfg)``, the towers from local pretrained files
  (``build_model`` calls it).
- ``config.py`` (``ModelConfig``, ``LossConfig``), ``flops.py``; ``bench.py`` is the app's.
"""

from mmpretrain.models.config import LossConfig, ModelConfig
from mmpretrain.models.pretrain import PretrainModel, build_model, build_model_from_dict

__all__ = ["PretrainModel", "build_model", "build_model_from_dict", "ModelConfig", "LossConfig"]
