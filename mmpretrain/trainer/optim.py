"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning rate.

No weight decay on norms, biases, embeddings (token / position / modality-type tables, class
token) or the logit scale: decaying them pulls LayerNorm gains and the temperature towards 0,
which is never what a pretraining run wants. The rule: parameters of ``nn.Embedding`` and norm
layers, every parameter with fewer than 2 dimensions (biases, gains, a ``[1]`` logit scale), and
parameters held directly whose name marks them as a position / type embedding or a token.

The schedule is a plain object (not a torch ``LRScheduler``) that writes ``lr`` into the
optimizer's param groups once per training step. It is not passed to ``accelerator.prepare``:
Accelerate's wrapper steps a scheduler ``num_processes`` times per call, and DeepSpeed would
step it inside ``engine.step()``; here the step count alone decides the rate, on every backend.
"""

from __future__ import annotations

import math

import torch

from mmpretrain.trainer.config import OptimConfig

# Parameters held directly (not by an nn.Embedding) that are embedding tables or tokens.
NO_DECAY_NAME_PARTS = ("pos_embed", "position", "cls_token", "type_embed", "modality_embed", "logit_scale")
NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
              torch.nn.RMSNorm)


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay (see the module docstring)."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, *NORM_TYPES)):
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(part in name.lower() for part in NO_DECAY_NAME_PARTS):
            names.add(name)
    return names


ITM_HEAD_PREFIXES = ("backbone.itm_head.", "backbone.itm_match.")


def param_groups(model: torch.nn.Module, weight_decay: float, itm_head_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: ``decay`` (weight matrices) and ``no_decay`` (everything else); with
    ``itm_head_lr_mult != 1`` the ITM head's parameters form ``itm_head_decay`` /
    ``itm_head_no_decay`` with ``lr_mult`` (read by ``WarmupCosine``)."""
    skip = no_decay_names(model)
    split = itm_head_lr_mult != 1.0
    buckets: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (False, True)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = split and name.startswith(ITM_HEAD_PREFIXES)
            buckets[(head, name not in skip)].append(p)
    groups = [{"params": buckets[(False, True)], "weight_decay": weight_decay, "name": "decay"},
              {"params": buckets[(False, False)], "weight_decay": 0.0, "name": "no_decay"},
              {"params": buckets[(True, True)], "weight_decay": weight_decay, "name": "itm_head_decay",
               "lr_mult": itm_head_lr_mult},
              {"params": buckets[(True, False)], "weight_decay": 0.0, "name": "itm_head_no_decay",
               "lr_mult": itm_head_lr_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.itm_head_lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based; the loop's step ``step + 1``).

    Linear warmup from lr/warmup to lr over the first ``warmup_steps`` steps (the last of them
    at lr), then cosine down to exactly ``lr * min_lr_ratio`` at the last step,
    ``total_steps - 1``. Without warmup the first step is at lr. The peak is taken once: the
    cosine starts at the peak step (the last warmup step, or step 0 without warmup). A run with
    no step after the peak (``total_steps <= max(warmup_steps, 1)``) never decays.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    peak = max(cfg.warmup_steps - 1, 0)
    decay_steps = total_steps - 1 - peak
    if decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - peak) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


class WarmupCosine:
    """Sets ``lr`` of every param group from the number of training steps taken.

    ``state_dict``/``load_state_dict`` make it checkpointable with
    ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = total_steps
        self.steps_taken = 0
        self.apply()

    @property
    def lr(self) -> float:
        return lr_at(self.steps_taken, self.cfg, self.total_steps)

    def apply(self) -> None:
        """Write the rate of the next optimizer step into the param groups."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_mult", 1.0)

    def step(self) -> None:
        """Call once per training step, skipped (non-finite) steps included: the rate is a
        function of the step counter."""
        self.steps_taken += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])
        self.apply()
