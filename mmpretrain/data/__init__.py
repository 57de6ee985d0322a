"""Data pipeline: shards, tokenizer, loader, transforms (see docs/data.md)."""

from mmpretrain.data.config import DataConfig

__all__ = ["DataConfig", "ShardLoader", "expand_sources", "load_tokenizer", "normalize", "tokenize",
           "train_tokenizer"]


def __getattr__(name):  # lazy: keep `import mmpretrain.data` cheap for the config tree
    if name in ("ShardLoader", "expand_sources"):
        from mmpretrain.data import loader

        return getattr(loader, name)
    if name in ("load_tokenizer", "tokenize", "train_tokenizer"):
        from mmpretrain.data import tokenizer

        return getattr(tokenizer, name)
    if name == "normalize":
        from mmpretrain.data.transforms import normalize

        return normalize
    raise AttributeError(name)
