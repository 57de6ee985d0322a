"""mmpretrain: distributed image-text pretraining.

Library imports (model, losses, data, export) never import the trainer.
"""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """Rebuild an exported model for inference (see ``mmpretrain.export``)."""
    from mmpretrain.export import load_pretrained as _load

    return _load(path, device=device)
