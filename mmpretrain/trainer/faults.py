"""Fault injection for tests, kept out of the model and of ``train_step``'s signature.

``train.inject_nan_steps`` / ``train.inject_nan_grad_steps`` (1-based steps) install a
``FaultInjection`` as the step's ``loss_hook`` (``StepContext``); without them there is no hook.
On the last rank, at those steps, the last micro-batch's loss is made non-finite, or kept finite
with a NaN gradient; every rank must then skip the step together. The reported loss metrics stay
those of the model's output (the hook changes only the loss that is checked and back-propagated).
"""

from __future__ import annotations

import torch


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class FaultInjection:
    """``loss_hook`` of one rank: reads the step about to run from the run's counters."""

    def __init__(self, counters, nan_steps, nan_grad_steps):
        self.counters = counters
        self.nan_steps, self.nan_grad_steps = set(nan_steps), set(nan_grad_steps)

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        step = self.counters.step + 1  # the loop counts the step after it ran
        if step in self.nan_steps:
            loss = loss * float("nan")
        if step in self.nan_grad_steps:
            loss = _NanGradient.apply(loss)
        return loss


def fault_injection(tcfg, counters, last_rank: bool) -> FaultInjection | None:
    """The hook the ``train`` section asks for on this rank (faults go to the last rank only)."""
    if not last_rank or not (tcfg.inject_nan_steps or tcfg.inject_nan_grad_steps):
        return None
    return FaultInjection(counters, tcfg.inject_nan_steps, tcfg.inject_nan_grad_steps)
