"""Data section of the config (owned by the data pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=lambda: ["shards/synthetic/train-*.tar"])
    """Shard sources: brace patterns, globs, directories, pipe:/fsspec URLs."""
    train_weights: list[float] = field(default_factory=list)
    """Mixing weights, one per entry of ``train_shards`` (empty: proportional to size)."""
    val_shards: str = "shards/synthetic/val-*.tar"
    """Held-out shards used by evaluation."""
    tokenizer: str = "auto"
    """'auto' (the tokenizer/ folder beside the shards, trained from captions if missing),
    a local tokenizer directory, or a hub name."""
    vocab_size: int = 4096
    """Vocabulary size when a WordPiece tokenizer is trained from the captions."""
    max_length: int = 32
    """Token sequence length (padding and truncation); at most ``model.max_text_length`` (set one,
    the other follows)."""
    image_size: int = 64
    """Square side of the resized/cropped image fed to the model: the same fact as
    ``model.image_size`` (set one, the other follows; both set and different is an error)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel (RGB) mean subtracted from the pixels scaled to [0, 1] (ImageNet's)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel (RGB) standard deviation the pixels are divided by after the mean (ImageNet's)."""
    global_batch_size: int = 32
    """The global batch of one micro-step: all ranks together, split across them (each rank gets
    global_batch_size // world size; it must divide); an optimizer step sees global_batch_size x
    train.grad_accum_steps samples. Formerly ``data.batch_size`` (still read, with a warning)."""
    num_workers: int = 2
    """DataLoader workers per rank."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer per worker (0 disables)."""
    max_image_pixels: int = 50_000_000
    """Images above this pixel count are rejected before decoding."""
    train_crop: Literal["random_resized", "center"] = "random_resized"
    """Crop of the training images: 'random_resized' (area in ``train_crop_scale``) or 'center'."""
    train_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """Area range kept by the random-resized training crop. Near 1 by default: captions describe
    the whole image (every object and where it is), so a small crop makes them false."""
    resample: bool = False
    """Sample shards with replacement (infinite stream) instead of epochs."""
    num_samples: int = 0
    """Samples in the remote (http(s), s3, fsspec, pipe:) train shards that no manifest.json
    lists, all sources together; the plan gives each such shard an even share instead of
    counting it, which reads every one of them in full at start-up on every rank (0: count)."""
    remote_retries: int = 5
    """Retries of a failed remote shard read (connection drop, timeout, HTTP 5xx/429, a short
    body), in a row without progress; each resumes at the byte offset reached. Then the rest of
    the piece is skipped (counted as remote_read_failed, with a warning naming the URL)."""
    remote_backoff_s: float = 1.0
    """Wait before the first retry of a remote read; doubled for each further one in a row."""
    remote_timeout_s: float = 30.0
    """Socket timeout of remote reads, per operation (connect, each read)."""

    def __post_init__(self):
        for name, low in (("max_length", 1), ("global_batch_size", 1), ("max_image_pixels", 1), ("num_workers", 0),
                          ("shuffle_buffer", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {getattr(self, name)}")
        scale = list(self.train_crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"data.train_crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale}")
        if self.num_samples < 0:
            raise ValueError(f"data.num_samples must be >= 0, got {self.num_samples}")
        if self.remote_retries < 0:
            raise ValueError(f"data.remote_retries must be >= 0, got {self.remote_retries}")
        if self.remote_backoff_s < 0:
            raise ValueError(f"data.remote_backoff_s must be >= 0, got {self.remote_backoff_s}")
        if not self.remote_timeout_s > 0:
            raise ValueError(f"data.remote_timeout_s must be > 0, got {self.remote_timeout_s}")
