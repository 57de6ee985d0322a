"""Optimizer and trainer sections of the config (owned by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = None  # type: ignore[assignment]
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """0 disables clipping."""

    def __post_init__(self):
        if self.betas is None:
            self.betas = [0.9, 0.98]


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 200
    resume: str = ""
    """'' (fresh), 'latest' or a checkpoint directory."""
    grad_accum_steps: int = 1
    feature_cache: bool = True
    """With grad_accum_steps > 1, contrast against the whole accumulated batch (extra
    no-grad forward per micro-batch)."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (DeepSpeed runs take it from the launch config)."""
    compile: bool = False
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 3
    eval_every: int = 0
    """0: evaluate only at the end."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses tolerated before the run stops."""
    tensorboard: bool = True
    progress_bar: bool = True
