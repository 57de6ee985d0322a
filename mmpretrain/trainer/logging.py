"""Rank-aware run logging: one dense console line every N steps, every step's metrics to
``metrics.jsonl`` and to the experiment trackers (``train.report_to``: TensorBoard, W&B, MLflow,
through Accelerate; ``trainer/trackers.py``), a progress bar — all on the main process only.
``metrics.jsonl`` is the record; the trackers get the same scalars at the same steps.

The console line reads::

    step 120/2000 | loss 2.3142 itc 1.6021 itm 0.7121 itm_acc 0.56 | lr 4.8e-04 | 812 samples/s
    | data 3% | mem 2.1 GB | mfu 31.2% | eta 0:12:40

``data`` is the share of the step's wall time spent waiting for the loader (above a few percent
the loader is the bottleneck). ``mem`` is the peak accelerator memory, or the process's peak
resident memory on CPU. MFU is model FLOPs (models/flops.py) per second over the device peak.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mmpretrain.trainer.trackers import eval_scalars, train_scalars

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0, "4090": 165.0, "3090": 71.0, "T4": 65.0}


def guess_peak_tflops() -> float:
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return 0.0


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / 1e9


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a resumed run re-does those steps)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    # atomic: a kill during the rewrite leaves the old file whole (it once wiped 300k lines)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(k + "\n" for k in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLogger:
    """Every method is a no-op on non-main ranks.

    ``tracker_log(scalars, step)``: where the trackers' scalars go (the trackers of ``accelerator.trackers``), or
    None without trackers."""

    def __init__(self, out_dir: str | Path, *, is_main: bool, total_steps: int, start_step: int,
                 log_every: int, progress_bar: bool, flops_per_sample: float = 0.0,
                 peak_tflops: float = 0.0, world_size: int = 1,
                 tracker_log: Callable[[dict, int], None] | None = None):
        self.is_main = is_main
        self.total_steps = total_steps
        self.log_every = log_every
        self.flops_per_sample = flops_per_sample
        self.peak_flops = (peak_tflops or guess_peak_tflops()) * 1e12 * world_size
        self.start_step = start_step
        self.window: list[dict] = []
        self.t_start = time.perf_counter()
        self.steps_timed = 0
        self.time_timed = 0.0
        self.metrics_file = None
        self.tracker_log = tracker_log if is_main else None
        self.last_record: dict = {}
        """The newest training record (the end-of-run summary reads it)."""
        self.last_val: dict = {}
        self.last_eval: dict = {}
        self.tracker_failures: dict[str, int] = {}
        """Failed tracker logging calls by tracker (the loop's ``tracker_log`` counts them)."""
        self.bar = None
        if not is_main:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out / "metrics.jsonl", start_step)
        self.metrics_file = open(out / "metrics.jsonl", "a")
        if progress_bar and sys.stderr.isatty():  # no bar in batch-job logs
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            leave=False, file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def log_step(self, step: int, metrics: dict, *, step_seconds: float, data_seconds: float,
                 samples: int) -> None:
        """Record one optimizer step (``metrics``: losses, lr, counters, and at evaluation steps the
        validation loss as ``val/<part>``; already global means)."""
        if not self.is_main:
            return
        # the first timed step includes start-up (compilation, allocator warm-up): leave it out of rates
        if step > self.start_step + 1 or self.total_steps == self.start_step + 1:
            self.steps_timed += 1
            self.time_timed += step_seconds
        record = dict(metrics, step=step, samples_per_s=samples / max(step_seconds, 1e-9),
                      data_wait=data_seconds / max(step_seconds, 1e-9), step_s=step_seconds,
                      mem_gb=memory_gb(), time=time.time())
        if self.flops_per_sample and self.peak_flops:
            record["mfu"] = self.flops_per_sample * record["samples_per_s"] / self.peak_flops
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tracker_log is not None:
            self.tracker_log(train_scalars(record), step)
        self.last_record = record
        val = {k[4:]: v for k, v in record.items() if k.startswith("val/")}
        if val:
            self.last_val = dict(val, step=step)
            self.info(f"val @ step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
        self.window.append(record)
        if step % self.log_every == 0 or step == self.total_steps:
            self.info(self.dense_line(step))
            self.window = []

    def dense_line(self, step: int) -> str:
        w = self.window
        mean = lambda k: sum(r.get(k, 0.0) for r in w) / max(len(w), 1)  # noqa: E731
        time_sum = sum(r["step_s"] for r in w)
        samples_per_s = sum(r["samples_per_s"] * r["step_s"] for r in w) / max(time_sum, 1e-9)
        data_share = sum(r["data_wait"] * r["step_s"] for r in w) / max(time_sum, 1e-9)
        parts = [f"step {step}/{self.total_steps}", f"loss {mean('loss'):.4f}"]
        for key, label in (("loss_itc", "itc"), ("loss_itm", "itm"), ("itm_acc", "itm_acc"), ("loss_mlm", "mlm"),
                           ("mlm_acc", "mlm_acc")):
            if key in w[-1]:
                parts[-1] += f" {label} {mean(key):.4f}"
        parts += [f"lr {w[-1].get('lr', 0.0):.2e}", f"{samples_per_s:.0f} samples/s",
                  f"data {100 * data_share:.0f}%", f"mem {w[-1]['mem_gb']:.2f} GB"]
        if "mfu" in w[-1]:
            parts.append(f"mfu {100 * mean('mfu'):.1f}%")
        else:
            parts.append("mfu n/a")
        per_step = self.time_timed / self.steps_timed if self.steps_timed else float("nan")
        parts.append(f"eta {format_eta(per_step * (self.total_steps - step))}")
        bad = w[-1].get("bad_steps_total", 0)
        if bad:
            parts.append(f"skipped {bad}")
        return " | ".join(parts)

    def log_eval(self, step: int, results: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, "eval": results, "time": time.time()}
        self.metrics_file.write(json.dumps(record, default=float) + "\n")
        self.metrics_file.flush()
        if self.tracker_log is not None:
            self.tracker_log(eval_scalars(results), step)
        self.last_eval = dict(results, step=step)
        headline = [k for k in results if k.endswith("R@1") or k.endswith("mean_recall")]
        self.info(f"eval @ step {step}: " + ", ".join(f"{k} {float(results[k]):.2f}" for k in headline)
                  + " (all metrics: metrics.jsonl, eval/)")

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
