"""The trainer's ``Accelerator`` settings from the config; ``start_runtime(spec, train)`` hands them to
``mmpretrain.runtime`` (the one owner of the Accelerator and the process group, its launch
checks and its teardown) after the checks that need the config.

One code path for one process, DDP and DeepSpeed ZeRO-2/3 (see docs/training.md and
launch/README.md for the commands). What this module adds to the runtime's launch checks:

* The data loader is never passed to ``accelerator.prepare`` (it splits by rank itself), so
  DeepSpeed cannot infer batch sizes: this module fills the JSON's ``"auto"`` batch sizes,
  gradient accumulation, clipping and precision from our config, and refuses a JSON whose
  explicit values disagree with it — the two can never say different things.

What the launch takes from the config tree is an ``AcceleratorSpec`` (``from_config``: a few
values of the data, model, loss, optim and train sections); ``start_runtime`` takes it and the
train section (the trackers), and every check and the DeepSpeed JSON read only the spec.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from mmpretrain import runtime
from mmpretrain.config import Config
from mmpretrain.models.config import LossConfig
from mmpretrain.trainer.config import TrainConfig
from mmpretrain.runtime import LaunchError, LaunchInfo, distributed_type_name  # noqa: F401 (the trainer's names)


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """``data.global_batch_size`` is the global batch of one micro-step; every rank gets an equal share."""
    if global_batch_size < 1 or global_batch_size % world_size:
        raise LaunchError(
            f"data.global_batch_size={global_batch_size} (the global batch per micro-step) is not divisible "
            f"by the world size {world_size}; use a multiple of {world_size}")
    return global_batch_size // world_size


@dataclass(frozen=True)
class AcceleratorSpec:
    """What the Accelerator, its launch checks and the DeepSpeed JSON take from the config."""

    global_batch_size: int
    """``data.global_batch_size``: the global batch of one micro-step."""
    grad_accum_steps: int
    """``train.grad_accum_steps``."""
    grad_clip: float
    """``optim.grad_clip`` (0: none)."""
    mixed_precision: str
    """``train.mixed_precision``: 'no', 'bf16' or 'fp16'."""
    width: int
    """``model.width``: sizes DeepSpeed's "auto" communication buckets."""
    compile: bool = False
    """``train.compile``."""
    unused_parameters: bool = False
    """A loss term leaves parameters without a gradient (``may_leave_parameters_unused``)."""

    @classmethod
    def from_config(cls, cfg: Config) -> "AcceleratorSpec":
        return cls(global_batch_size=cfg.data.global_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                   grad_clip=float(cfg.optim.grad_clip), mixed_precision=cfg.train.mixed_precision,
                   width=cfg.model.width, compile=cfg.train.compile,
                   unused_parameters=may_leave_parameters_unused(cfg.loss))


# ----------------------------------------------------------------------------- DeepSpeed config

def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def fill_deepspeed_config(ds: dict, spec: AcceleratorSpec, world_size: int) -> dict:
    """The DeepSpeed JSON with every ``"auto"`` batch / accumulation / clipping / precision /
    bucket entry filled from ``spec``; an explicit value that disagrees is a ``LaunchError``."""
    ds = json.loads(json.dumps(ds))  # deep copy
    micro = per_rank_batch_size(spec.global_batch_size, world_size)
    accum = spec.grad_accum_steps
    mp = spec.mixed_precision
    width = spec.width
    ours = {
        "train_micro_batch_size_per_gpu": (micro, "data.global_batch_size / world size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum_steps"),
        "train_batch_size": (spec.global_batch_size * accum, "data.global_batch_size * train.grad_accum_steps"),
        "gradient_clipping": (float(spec.grad_clip), "optim.grad_clip"),
        "bf16.enabled": (mp == "bf16", "train.mixed_precision"),
        "fp16.enabled": (mp == "fp16", "train.mixed_precision"),
    }
    bucket_keys = {
        "zero_optimization.reduce_bucket_size": width * width,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * width * width),
        "zero_optimization.stage3_param_persistence_threshold": 10 * width,
    }
    problems = []
    for key, (value, source) in ours.items():
        current = _get(ds, key)
        if current is None or current == "auto":
            _set(ds, key, value)
        elif (float(current) if isinstance(value, float) else current) != value:
            problems.append(f"  {key}={current!r} in the DeepSpeed config, but {source} gives {value!r}")
    for key, value in bucket_keys.items():
        if _get(ds, key) == "auto":
            _set(ds, key, value)
    if problems:
        raise LaunchError("the DeepSpeed config disagrees with the mmpretrain config (set these to "
                          "\"auto\" to take ours):\n" + "\n".join(problems))
    if "scheduler" in ds or "optimizer" in ds:
        raise LaunchError("the DeepSpeed config must not define 'optimizer' or 'scheduler': the trainer "
                          "builds AdamW and the warmup-cosine schedule from the optim section")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    for kind in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(kind), dict) and zero[kind].get("device") == "auto":
            env = "ACCELERATE_DEEPSPEED_" + kind.upper() + "_DEVICE"
            zero[kind]["device"] = os.environ.get(env, "none")
    return ds


def deepspeed_json_from_env() -> dict:
    """The launch's DeepSpeed JSON (``deepspeed_config_file`` in the accelerate YAML), or the
    equivalent of ``--use_deepspeed --zero_stage N [--offload_*]`` when there is none."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path != "none":
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise LaunchError(f"DeepSpeed config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise LaunchError(f"{path}: not valid JSON: {e}") from None
    zero: dict = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for kind in ("offload_optimizer", "offload_param"):
        device = os.environ.get("ACCELERATE_DEEPSPEED_" + kind.upper() + "_DEVICE", "none")
        if device != "none":
            zero[kind] = {"device": device}
    return {"zero_optimization": zero}


def may_leave_parameters_unused(loss: LossConfig) -> bool:
    """DDP must be told when a loss term is off: without ITM the fused head gets no gradient,
    and a non-InfoNCE contrastive loss leaves the logit scale out of the graph."""
    return loss.itm_weight == 0 or loss.contrastive_weight == 0 or loss.contrastive != "infonce"


def _check_launch_env(spec: AcceleratorSpec) -> None:
    """Launcher settings that would silently override our config."""
    env = os.environ
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    if mp and mp != "no" and mp != spec.mixed_precision:
        raise LaunchError(f"the launcher asks for mixed_precision={mp} but train.mixed_precision="
                          f"{spec.mixed_precision!r}; set train.mixed_precision={mp} (the config is the "
                          "single source) and leave the launch config at 'no'")
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if gas and gas.isdigit() and int(gas) not in (1, spec.grad_accum_steps):
        raise LaunchError(f"the launcher asks for gradient_accumulation_steps={gas} but "
                          f"train.grad_accum_steps={spec.grad_accum_steps}; set it in the config only")


# ----------------------------------------------------------------------------- the Accelerator

def start_runtime(spec: AcceleratorSpec, train: TrainConfig) -> runtime.Runtime:
    """The training's ``Runtime``: its ``Accelerator`` built for this launch from ``spec``
    (``AcceleratorSpec.from_config``) and checked against it (``LaunchError`` otherwise, before
    any work); the trackers (``train.report_to``) from the train section."""
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    info = runtime.launch_info()
    per_rank_batch_size(spec.global_batch_size, info.world_size)  # fail before any process group work
    runtime.check_single_process_launch(info)
    _check_launch_env(spec)
    if info.use_deepspeed and not info.launched:
        raise LaunchError("DeepSpeed needs a launcher: use `accelerate launch --config_file launch/zero2.yaml "
                          "-m mmpretrain.train ...` (or `torchrun --nproc_per_node 1` for one process)")
    if info.use_deepspeed and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        raise LaunchError("ACCELERATE_USE_CPU is set together with DeepSpeed: Accelerate would silently run "
                          "DDP instead. Unset ACCELERATE_USE_CPU (CPU DeepSpeed runs use gloo by themselves)")

    kwargs: dict = dict(
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=spec.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if spec.compile else None,
    )
    if info.use_deepspeed:
        ds = fill_deepspeed_config(deepspeed_json_from_env(), spec, info.world_size)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=ds, gradient_accumulation_steps=spec.grad_accum_steps,
            gradient_clipping=spec.grad_clip, zero_stage=ds["zero_optimization"]["stage"])
        # DeepSpeed 0.19 calls collectives torch 2.14 deprecates, with a warning on every call
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if train.report_to:  # Accelerate's trackers, started by trackers.start once the run directory exists
        from mmpretrain.trainer import trackers

        kwargs["log_with"] = trackers.build(train)
    if not info.use_deepspeed and info.world_size > 1 and spec.unused_parameters:
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return runtime.start_accelerator(info, **kwargs)  # adds the CPU/gloo settings, checks the launch


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


_MODE_NAMES = {"NO": "single process", "MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "MULTI_XPU": "DDP",
               "MULTI_NPU": "DDP", "MULTI_MLU": "DDP", "MULTI_HPU": "DDP", "FSDP": "FSDP", "XLA": "XLA"}


def launch_mode(distributed_type: str, zero: int, world: int) -> str:
    """The start-up line's words for a launch: ``single process``, ``DDP, 2 processes``,
    ``DeepSpeed ZeRO-2, 8 processes`` (not Accelerate's enum names ``NO`` / ``MULTI_CPU`` /
    ``DEEPSPEED``, which checkpoints record)."""
    name = f"DeepSpeed ZeRO-{zero}" if distributed_type == "DEEPSPEED" else _MODE_NAMES.get(
        distributed_type, distributed_type)
    return name if world == 1 and name == "single process" else f"{name}, {world} process{'es' if world != 1 else ''}"
