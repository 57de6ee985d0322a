"""Optimizer and trainer sections of the config (owned by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate of AdamW (reached after ``warmup_steps``)."""
    weight_decay: float = 0.05
    """AdamW (decoupled) weight decay of the weight matrices; norms, biases, embedding tables, class
    tokens and the logit scale get none (trainer/optim.py)."""
    betas: list[float] = None  # type: ignore[assignment]
    """AdamW betas [beta1, beta2]."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 20
    """Linear warm-up to ``lr`` over the first N optimizer steps (from lr / N), then the cosine."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the global L2 norm of the gradients to this (0 disables clipping)."""
    itm_head_lr_mult: float = 1.0
    """The ITM head's learning rate is ``lr`` x this (its own AdamW groups, the same schedule).
    AdamW moves a parameter by about ``lr`` per step whatever its gradient, so a head whose
    calibration needs its bias moved by several units (``model.itm_head: match`` starts at
    ``logit_scale_init`` x cosine, all pairs "match") cannot get there in a few hundred steps at
    ``lr`` and the fusion blocks shift every score instead (docs/BENCHMARKS.md "Seventh pass")."""

    def __post_init__(self):
        if self.betas is None:
            self.betas = [0.9, 0.98]
        if self.itm_head_lr_mult <= 0:
            raise ValueError(f"optim.itm_head_lr_mult must be > 0, got {self.itm_head_lr_mult}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim: need lr > 0, warmup_steps >= 0, grad_clip >= 0, 0 <= min_lr_ratio <= 1")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have 2 values, got {self.betas}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, eval/ (and wandb/
    with train.report_to=wandb)."""
    max_steps: int = 200
    """Optimizer steps (the cosine schedule ends here)."""
    resume: str = ""
    """'' (fresh), 'latest' or a checkpoint directory."""
    overwrite: bool = False
    """A fresh run (no ``resume``) into an ``output_dir`` that already holds a run (checkpoints,
    metrics.jsonl, tensorboard/, eval/) is refused unless this is true; then those are deleted
    first, so nothing of the old run is read or reported as the new one."""
    grad_accum_steps: int = 1
    """Micro-batches of ``data.global_batch_size`` per optimizer step."""
    feature_cache: bool = True
    """With grad_accum_steps > 1 and the InfoNCE loss, contrast against the whole accumulated
    batch (extra no-grad forward per micro-batch). Ignored with loss.contrastive=triplet."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """'no', 'bf16' or 'fp16'. The single source of truth: it fills the DeepSpeed JSON's "auto"
    precision entries, and a launch config that asks for something else is an error."""
    compile: bool = False
    """torch.compile the model (Accelerate's dynamo backend 'inductor')."""
    log_every: int = 10
    """Console line every N steps (metrics.jsonl and TensorBoard get every step)."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end, and on a stop request)."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are deleted)."""
    eval_every: int = 0
    """Every N steps: the retrieval evaluation (as at the end) and the validation loss (also at
    the last step; train.val_batches). 0: evaluate only at the end, no validation loss."""
    eval_at_end: bool = True
    """Evaluate on data.val_shards when training finishes (not after a stop request)."""
    max_bad_steps: int = 5
    """Consecutive bad steps (non-finite loss, or non-finite gradient norm without fp16 loss
    scaling) tolerated before the run stops. fp16 loss-scale overflows are not bad steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, through Accelerate's: any of 'tensorboard' (OUTPUT_DIR/tensorboard),
    'wandb' (respects WANDB_MODE, e.g. offline; runs under OUTPUT_DIR/wandb unless WANDB_DIR is
    set) and 'mlflow' (respects MLFLOW_TRACKING_URI); [] or 'none' for none. Each gets the
    scalars of metrics.jsonl (train/<key>, val/<part>, eval/<metric>) at the same steps, and the
    config as hyperparameters; only the main process logs. 'wandb,mlflow' works as a list."""
    tracker_project: str = "mmpretrain"
    """The W&B project and the MLflow experiment (MLFLOW_EXPERIMENT_NAME takes precedence, as in
    Accelerate)."""
    run_name: str = ""
    """The trackers' run name; '' gives the output directory's name."""
    tensorboard: bool = True
    """false drops 'tensorboard' from train.report_to (the older switch, kept)."""
    val_batches: int = 4
    """With eval_every > 0: the validation loss (the training loss parts, no gradient) on the first
    N full global batches (data.global_batch_size) of data.val_shards, every eval_every steps and at the
    last step, as val/loss and val/<part>; the same value for any world size. 0: off."""
    progress_bar: bool = True
    """A progress bar on the main process's console (when it is a terminal)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 guesses it from the GPU name (no MFU on CPU)."""
    stop_after_steps: int = 0
    """Stop (checkpoint, exit 0) after this many optimizer steps in this process, as a
    preemption would; 0 never. The schedule still follows max_steps."""
    emulate_world_size: int = 0
    """Debug/reproducibility: one process reads the data as this many ranks would and trains on
    their concatenated batches, i.e. the exact global batches of that many processes. 0: off."""
    inject_nan_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: at these steps (1-based) the loss of the last rank is made
    non-finite, which every rank must then skip together."""
    inject_nan_grad_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: at these steps (1-based) the last rank's loss stays finite but
    its gradient becomes NaN (every rank sees it after the gradient all-reduce)."""

    def __post_init__(self):
        for name in ("max_steps", "grad_accum_steps", "log_every", "save_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.stop_after_steps < 0 or self.emulate_world_size < 0:
            raise ValueError("train.eval_every, train.stop_after_steps and train.emulate_world_size must be >= 0")
        if self.val_batches < 0:
            raise ValueError(f"train.val_batches must be >= 0, got {self.val_batches}")
        self.report_to = normalize_report_to(self.report_to, self.tensorboard)


TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")


def normalize_report_to(value, tensorboard: bool = True) -> list[str]:
    """``train.report_to`` as a list of known tracker names, in order, without repeats: a
    comma-separated string is split, 'none' (or '', or an empty list) means no tracker, and
    ``train.tensorboard=false`` removes 'tensorboard'."""
    items = [value] if isinstance(value, str) or value is None else list(value)
    names: list[str] = []
    for item in items:
        for name in str(item if item is not None else "none").split(","):
            name = name.strip().lower()
            if name and name not in names:
                names.append(name)
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"train.report_to: 'none' cannot be combined with trackers ({names})")
        return []
    unknown = [n for n in names if n not in TRACKER_NAMES]
    if unknown:
        raise ValueError(f"train.report_to: unknown tracker {unknown[0]!r}; choose from {list(TRACKER_NAMES)} "
                         "or 'none'")
    return [n for n in names if tensorboard or n != "tensorboard"]
