"""Data pipeline: shards, tokenizer, loader, transforms (see docs/data.md)."""

from mmpretrain.data.config import DataConfig

__all__ = ["DataConfig", "ShardLoader", "expand_sources", "load_tokenizer", "normalize", "tokenize",
           "train_tokenizer"]


def __getattr__(name):  # lazy: keep `import mmpretrain.data` cheap for the config tree
    if name == "ShardLoader":
        from mmpretrain.data.loader import ShardLoader

        return ShardLoader
    if name == "expand_sources":
        from mmpretrain.data.shardio import expand_sources

        return expand_sources
    if name in ("load_tokenizer", "tokenize", "train_tokenizer"):
        from mmpretrain.data import tokenizer

        return getattr(tokenizer, name)
    if name == "normalize":
        from mmpretrain.data.transforms import normalize

        return normalize
    raise AttributeError(name)
