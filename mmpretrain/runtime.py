"""The one owner of this process's runtime: the ``Accelerator`` and the process group (app side).

Train, eval and the model bench start a ``Runtime`` here and ask it, never the environment,
Accelerate or ``torch.distributed``, for their place in the launch:

* ``start_accelerator(info, **kwargs)``: the ``Accelerator`` for however the process was launched
  (train: ``trainer.accel.start_runtime`` adds the config's precision, accumulation and DeepSpeed
  plugin), checked against the launch (``check_accelerator``) before any work happens.
* ``start_if_launched()``: the same, but only when a launcher started several processes; else a
  one-process runtime without an Accelerator (evaluation needs no DDP/DeepSpeed wrapping).
* ``start_process_group(backend)``: under torchrun a plain process group, no Accelerator (the
  model bench measures real gloo collectives); one process otherwise.

A ``Runtime`` answers ``rank``, ``world_size``, ``is_main``, ``device`` and ``gather_objects(obj)``,
and ``close()`` (or leaving ``with runtime:``) is the one teardown. Before a runtime exists,
``launch_info()`` is what the launcher set (``LaunchInfo.rank`` names the rank in start-up
messages).

Who touches ``torch.distributed``: this module creates and destroys the process group
(``init_process_group`` for the bench; Accelerate's ``end_training`` or ``destroy_process_group``
at teardown), and ``mmpretrain.distributed`` (the library: rank, world size, barrier and every
collective) does the rest. No other module of the package calls it
(tests/unit/test_runtime.py checks this).

Facts this module encodes (checked on CPU with gloo; docs/training.md, launch/README.md):

* Without a GPU, Accelerate picks no process-group backend while DeepSpeed starts gloo by
  itself, so Accelerate would believe it has one process. When a launcher started us
  (``LOCAL_RANK`` set) and there is no GPU: DeepSpeed runs get ``InitProcessGroupKwargs(
  backend="gloo")``, every other run ``cpu=True``.
* DeepSpeed without a GPU builds its shared-memory all-reduce op (``deepspeed_shm_comm``) when
  its comm backend starts: a C++ compile on first use (about 65 s of CPU, cached in
  ``~/.cache/torch_extensions/``; it needs g++ and the Python headers). That op serves only
  DeepSpeed inference's ``inference_all_reduce`` (AutoTP layers); ZeRO training's collectives go
  through the gloo process group. CPU DeepSpeed runs mark it unavailable in DeepSpeed's own
  op table (``deepspeed.ops.__compatible_ops__``, kept per process for this purpose), so they
  start without a compiler.
* Silent failures (a single process where two were asked for, DeepSpeed quietly dropped for DDP,
  two processes whose gradients are never synchronised) are caught by comparing Accelerate's
  process count with the launcher's ``WORLD_SIZE`` and ``torch.distributed``'s world size, and
  Accelerate's distributed type with the one launched.
* Teardown: on a clean exit every rank waits for the others (a barrier) before the process group
  is destroyed. Destroying a gloo group while a peer still ran its final collective aborted that
  peer at exit with "terminate called without an active exception" (evaluation: 3 of 8 runs
  without the barrier). After an exception there is no barrier (the peers may never reach it: a
  hang is worse than an abort); the group is still destroyed and Accelerate's state reset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpretrain import distributed


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
    rank: int = 0
    """``RANK`` from the launcher (0 without one): for messages before the runtime exists."""

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
        world_size=int(env.get("WORLD_SIZE") or 1),
        use_deepspeed=env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"),
        has_gpu=torch.cuda.is_available(),
        rank=int(env.get("RANK") or 0),
    )


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


def check_accelerator(accelerator, info: LaunchInfo) -> None:
    """Accelerate's view must equal the launcher's and torch.distributed's, or nothing runs."""
    got_type = distributed_type_name(accelerator)
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


def distributed_type_name(accelerator) -> str:
    t = accelerator.distributed_type
    return t.name if hasattr(t, "name") else str(t)


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (``AcceleratorState``, ``PartialState``,
    ``GradientState``), so another ``Accelerator`` can be built in this process (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Runtime:
    """This process's place in the launch, and the one teardown (``close``)."""

    def __init__(self, info: LaunchInfo, accelerator=None, *, group: bool = False, owns_group: bool = False):
        self.info = info
        self.accelerator = accelerator
        """The checked ``Accelerator``, or None (one process without one, or a plain process group)."""
        self._group = group or accelerator is not None  # rank and world come from the process group
        self._owns_group = owns_group
        self._closed = False

    @property
    def rank(self) -> int:
        return distributed.get_rank() if self._group else 0

    @property
    def world_size(self) -> int:
        return distributed.get_world_size() if self._group else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process. A collective."""
        return distributed.all_gather_objects(obj) if self._group else [obj]

    def close(self, *, clean: bool = True) -> None:
        """End the process group and forget Accelerate's state (idempotent). ``clean``: every
        rank reached this point normally, so all wait for each other first (see the module
        docstring); pass False after an exception."""
        if self._closed:
            return
        self._closed = True
        if clean and self._group:
            distributed.barrier()  # every rank past its last collective before the group goes
        if self.accelerator is not None:
            self.accelerator.end_training()  # trackers, then destroys the default process group
            reset_accelerate_state()
        elif self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(clean=exc_type is None)
        return False


def skip_deepspeed_shm_op() -> None:
    """Before DeepSpeed's comm backend starts on CPU: its shared-memory inference all-reduce op
    is not built (no C++ compile; ZeRO training never calls it; see the module docstring)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_accelerator(info: LaunchInfo | None = None, **accelerator_kwargs) -> Runtime:
    """A ``Runtime`` around an ``Accelerator(**accelerator_kwargs)`` built for this launch (no
    GPU: gloo for DeepSpeed, ``cpu=True`` otherwise) and checked against it; a ``LaunchError``
    leaves no process group and no Accelerate state behind."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    info = info if info is not None else launch_info()
    kwargs = dict(accelerator_kwargs)
    if info.use_deepspeed:
        if not info.has_gpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo"), *kwargs.get("kwargs_handlers", [])]
            skip_deepspeed_shm_op()
    elif not info.has_gpu:
        kwargs["cpu"] = True
    runtime = Runtime(info, Accelerator(**kwargs))
    try:
        check_accelerator(runtime.accelerator, info)
    except LaunchError:
        runtime.close(clean=False)
        raise
    return runtime


def start_if_launched() -> Runtime:
    """``start_accelerator()`` when a launcher started several processes (Accelerate sets
    DeepSpeed up from the launch environment when asked), else one process without an
    Accelerator."""
    info = launch_info()
    if not info.launched or info.world_size == 1:
        return Runtime(info)
    return start_accelerator(info)


def start_process_group(backend: str = "gloo") -> Runtime:
    """Under a launcher with several processes, the default process group (created here unless
    one exists; then ``close`` leaves it to its owner), without an Accelerator; else one process."""
    info = launch_info()
    if info.world_size <= 1:
        return Runtime(info)
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return Runtime(info, group=True, owns_group=owns)
