"""Build the ``Accelerator`` for however the process was started, and check that it is what was
launched before any work happens.

One code path for one process, DDP and DeepSpeed ZeRO-2/3 (see docs/training.md and
launch/README.md for the commands). The facts this module encodes (checked on CPU with gloo):

* Without a GPU, Accelerate picks no process-group backend while DeepSpeed starts gloo by
  itself, so Accelerate would believe it has one process. When a launcher started us
  (``LOCAL_RANK`` set) and there is no GPU: DeepSpeed runs get ``InitProcessGroupKwargs(
  backend="gloo")``, every other run ``cpu=True``.
* Silent failures (a single process where two were asked for, DeepSpeed quietly dropped for DDP,
  two processes whose gradients are never synchronised) are caught by comparing Accelerate's
  process count with the launcher's ``WORLD_SIZE`` and ``torch.distributed``'s world size, and
  Accelerate's distributed type with the one launched.
* The data loader is never passed to ``accelerator.prepare`` (it splits by rank itself), so
  DeepSpeed cannot infer batch sizes: this module fills the JSON's ``"auto"`` batch sizes,
  gradient accumulation, clipping and precision from our config, and refuses a JSON whose
  explicit values disagree with it — the two can never say different things.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpretrain import distributed
from mmpretrain.config import Config


class LaunchError(RuntimeError):
    """The process was started in a way that does not match the config or itself."""


@dataclass
class LaunchInfo:
    """What the environment says was launched."""

    launched: bool
    """Started by a launcher (torchrun / accelerate launch): ``LOCAL_RANK`` is set."""
    world_size: int
    """``WORLD_SIZE`` from the launcher (1 without one)."""
    use_deepspeed: bool
    has_gpu: bool

    @property
    def expected_type(self) -> str:
        if self.use_deepspeed:
            return "DEEPSPEED"
        if self.world_size > 1:
            return "MULTI_GPU" if self.has_gpu else "MULTI_CPU"
        return "NO"


def launch_info() -> LaunchInfo:
    env = os.environ
    return LaunchInfo(
        launched="LOCAL_RANK" in env,
        world_size=int(env.get("WORLD_SIZE", "1")),
        use_deepspeed=env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"),
        has_gpu=torch.cuda.is_available(),
    )


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is the global batch of one micro-step; every rank gets an equal share."""
    if global_batch_size < 1 or global_batch_size % world_size:
        raise LaunchError(
            f"data.batch_size={global_batch_size} (the global batch per micro-step) is not divisible "
            f"by the world size {world_size}; use a multiple of {world_size}")
    return global_batch_size // world_size


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


def fill_deepspeed_config(ds: dict, cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON with every ``"auto"`` batch / accumulation / clipping / precision /
    bucket entry filled from ``cfg``; an explicit value that disagrees is a ``LaunchError``."""
    ds = json.loads(json.dumps(ds))  # deep copy
    micro = per_rank_batch_size(cfg.data.batch_size, world_size)
    accum = cfg.train.grad_accum_steps
    mp = cfg.train.mixed_precision
    width = cfg.model.width
    ours = {
        "train_micro_batch_size_per_gpu": (micro, "data.batch_size / world size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum_steps"),
        "train_batch_size": (cfg.data.batch_size * accum, "data.batch_size * train.grad_accum_steps"),
        "gradient_clipping": (float(cfg.optim.grad_clip), "optim.grad_clip"),
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


def _parent_asked_processes() -> int | None:
    """``--num_processes N`` of the ``accelerate launch`` that started this process, if it is
    our parent (Linux ``/proc``; None when unknown)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not any("accelerate" in a for a in args) or "launch" not in args:
        return None
    for i, arg in enumerate(args):
        if arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
        elif arg == "--num_processes" and i + 1 < len(args):
            value = args[i + 1]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def check_single_process_launch(info: LaunchInfo) -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process without a launcher
    environment (no WORLD_SIZE, no LOCAL_RANK): catch it from the parent's command line."""
    if info.launched or "MASTER_ADDR" not in os.environ:
        return
    asked = _parent_asked_processes()
    if asked is not None and asked > 1:
        raise LaunchError(f"accelerate launch asked for --num_processes {asked} but started 1 process (it does "
                          "that with --cpu); on CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                          f"--num_processes {asked}` or `torchrun --nproc_per_node {asked}`")


def may_leave_parameters_unused(cfg: Config) -> bool:
    """DDP must be told when a loss term is off: without ITM the fused head gets no gradient,
    and a non-InfoNCE contrastive loss leaves the logit scale out of the graph."""
    loss = cfg.loss
    return loss.itm_weight == 0 or loss.contrastive_weight == 0 or loss.contrastive != "infonce"


def _check_launch_env(cfg: Config) -> None:
    """Launcher settings that would silently override our config."""
    env = os.environ
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    if mp and mp != "no" and mp != cfg.train.mixed_precision:
        raise LaunchError(f"the launcher asks for mixed_precision={mp} but train.mixed_precision="
                          f"{cfg.train.mixed_precision!r}; set train.mixed_precision={mp} (the config is the "
                          "single source) and leave the launch config at 'no'")
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if gas and gas.isdigit() and int(gas) not in (1, cfg.train.grad_accum_steps):
        raise LaunchError(f"the launcher asks for gradient_accumulation_steps={gas} but "
                          f"train.grad_accum_steps={cfg.train.grad_accum_steps}; set it in the config only")


# ----------------------------------------------------------------------------- the Accelerator

def build_accelerator(cfg: Config):
    """The ``Accelerator`` for this launch, checked against it. Returns (accelerator, info)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    info = launch_info()
    per_rank_batch_size(cfg.data.batch_size, info.world_size)  # fail before any process group work
    check_single_process_launch(info)
    _check_launch_env(cfg)
    if info.use_deepspeed and not info.launched:
        raise LaunchError("DeepSpeed needs a launcher: use `accelerate launch --config_file launch/zero2.yaml "
                          "-m mmpretrain.train ...` (or `torchrun --nproc_per_node 1` for one process)")
    if info.use_deepspeed and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        raise LaunchError("ACCELERATE_USE_CPU is set together with DeepSpeed: Accelerate would silently run "
                          "DDP instead. Unset ACCELERATE_USE_CPU (CPU DeepSpeed runs use gloo by themselves)")

    kwargs: dict = dict(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if cfg.train.compile else None,
    )
    if info.use_deepspeed:
        ds = fill_deepspeed_config(deepspeed_json_from_env(), cfg, info.world_size)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=ds, gradient_accumulation_steps=cfg.train.grad_accum_steps,
            gradient_clipping=float(cfg.optim.grad_clip), zero_stage=ds["zero_optimization"]["stage"])
        if not info.has_gpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        # DeepSpeed 0.19 calls collectives torch 2.14 deprecates, with a warning on every call
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    elif not info.has_gpu:
        kwargs["cpu"] = True
    if not info.use_deepspeed and info.world_size > 1 and may_leave_parameters_unused(cfg):
        kwargs.setdefault("kwargs_handlers", []).append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(**kwargs)
    try:
        check_accelerator(accelerator, info)
    except LaunchError:
        reset_accelerate_state()
        raise
    return accelerator, info


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (``AcceleratorState``, ``PartialState``,
    ``GradientState``), so another ``Accelerator`` can be built in this process (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def check_accelerator(accelerator, info: LaunchInfo) -> None:
    """Accelerate's view must equal the launcher's and torch.distributed's, or nothing runs."""
    got_type = accelerator.distributed_type.name if hasattr(accelerator.distributed_type, "name") \
        else str(accelerator.distributed_type)
    torch_world = distributed.get_world_size()
    problems = []
    if accelerator.num_processes != info.world_size:
        problems.append(f"Accelerate sees {accelerator.num_processes} process(es) but the launcher started "
                        f"WORLD_SIZE={info.world_size}")
    if torch_world != info.world_size:
        problems.append(f"torch.distributed has world size {torch_world} but WORLD_SIZE={info.world_size}")
    if got_type != info.expected_type:
        problems.append(f"Accelerate runs distributed type {got_type} but {info.expected_type} was launched")
    if problems:
        hint = ("on CPU: DDP is `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or "
                "`torchrun --nproc_per_node N`; DeepSpeed is `accelerate launch --config_file launch/zero2.yaml` "
                "without ACCELERATE_USE_CPU; `accelerate launch --cpu --num_processes N` starts one process")
        raise LaunchError("launch check failed:\n  " + "\n  ".join(problems) + "\n" + hint)


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def distributed_type_name(accelerator) -> str:
    t = accelerator.distributed_type
    return t.name if hasattr(t, "name") else str(t)
