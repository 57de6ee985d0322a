"""One runtime owner (issue 8, item 3): ``mmpretrain.runtime`` builds and ends the Accelerator and
the process group for train, eval and the model bench, and answers rank, world size, is-main and
object gathers; ``mmpretrain.distributed`` runs the collectives. No other module touches
``torch.distributed``, builds an ``Accelerator`` or reads the launcher's rank variables.

The two-process behaviour (a real gloo group, the bench under torchrun) is in
tests/distributed/test_runtime_distributed.py.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmpretrain import distributed, runtime

PKG = Path(__file__).resolve().parents[2] / "mmpretrain"
OWNERS = {"mmpretrain/distributed.py", "mmpretrain/runtime.py"}
LAUNCH_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE"}
# Known readers of the launcher's variables outside the runtime, each with its owner. Remove an
# entry once it asks ``runtime.launch_info()`` instead.
KNOWN_ENV_READERS: set[str] = set()  # none left (trainer/checkpoint.py asks launch_info() since item 5)


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), rel)


def _uses_torch_distributed(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") or (
                    node.module == "torch" and any(a.name == "distributed" for a in node.names)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            lines.append(node.lineno)
    return lines


def _calls(tree: ast.Module, names: set[str]) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in names:
                out.append((name, node.lineno))
    return out


def _env_reads(tree: ast.Module) -> list[tuple[str, int]]:
    """``os.environ.get("RANK")``, ``os.environ["RANK"]``, ``env.get("RANK")``, ``"RANK" in env``,
    ``os.getenv("RANK")``: any string constant naming a launch variable in a lookup."""
    out = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("get", "getenv", "pop", "setdefault"):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and \
                any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            key = node.left.value
        if key in LAUNCH_VARS:
            out.append((key, node.lineno))
    return out


def test_only_distributed_and_runtime_touch_torch_distributed():
    bad = {rel: lines for rel, tree in _sources() if rel not in OWNERS and (lines := _uses_torch_distributed(tree))}
    assert not bad, f"torch.distributed outside {sorted(OWNERS)}: {bad}"
    # and both owners say so in their docstrings
    for rel in OWNERS:
        doc = ast.get_docstring(ast.parse((PKG.parent / rel).read_text(encoding="utf-8")))
        other = "mmpretrain.runtime" if rel == "mmpretrain/distributed.py" else "mmpretrain.distributed"
        assert other in doc and "torch.distributed" in doc, rel


def test_only_the_runtime_builds_or_ends_the_accelerator_and_the_process_group():
    names = {"Accelerator", "init_process_group", "destroy_process_group", "end_training", "_reset_state"}
    bad = {rel: found for rel, tree in _sources() if rel != "mmpretrain/runtime.py" and (found := _calls(tree, names))}
    assert not bad, bad


def test_only_the_runtime_reads_the_launchers_rank_variables():
    found = {rel: reads for rel, tree in _sources() if rel != "mmpretrain/runtime.py" and (reads := _env_reads(tree))}
    assert set(found) <= KNOWN_ENV_READERS, {k: v for k, v in found.items() if k not in KNOWN_ENV_READERS}
    assert _env_reads(ast.parse((PKG / "runtime.py").read_text())), "the scan must see runtime's own reads"


def test_one_process_runtime_answers_without_a_process_group(monkeypatch):
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for start in (runtime.start_if_launched, runtime.start_process_group):
        rt = start()
        assert rt.accelerator is None and (rt.rank, rt.world_size, rt.is_main) == (0, 1, True)
        assert rt.gather_objects({"a": 1}) == [{"a": 1}]
        rt.close()
        rt.close()  # idempotent


def test_launch_info_reads_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = runtime.launch_info()
    assert (info.launched, info.rank, info.world_size) == (True, 3, 4)
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var)
    info = runtime.launch_info()
    assert (info.launched, info.rank, info.world_size) == (False, 0, 1)


def test_start_accelerator_in_one_process_and_its_teardown(monkeypatch):
    from accelerate.state import PartialState

    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    with runtime.start_accelerator() as rt:
        assert runtime.distributed_type_name(rt.accelerator) == "NO" and PartialState._shared_state
        assert (rt.rank, rt.world_size, rt.is_main) == (0, 1, True) and rt.device == rt.accelerator.device
    assert not PartialState._shared_state  # a second Accelerator may be built afresh


class _FakeAccelerator:
    def __init__(self, events):
        self.events = events

    def end_training(self):
        self.events.append("end_training")


@pytest.mark.parametrize("raise_inside", [False, True])
def test_teardown_waits_for_every_rank_only_after_a_clean_exit(monkeypatch, raise_inside):
    """The race fixed in eval, for every user of the runtime: a rank must not destroy the group
    while a peer still runs its last collective, so a clean exit waits (barrier) first. After an
    exception it does not wait (the peers may never come); the group still ends."""
    events = []
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(runtime, "reset_accelerate_state", lambda: events.append("reset"))
    rt = runtime.Runtime(runtime.LaunchInfo(launched=True, world_size=2, use_deepspeed=False, has_gpu=False),
                         _FakeAccelerator(events))
    with pytest.raises(KeyError) if raise_inside else _nullcontext():
        with rt:
            if raise_inside:
                raise KeyError("a bug")
    assert events == (["end_training", "reset"] if raise_inside else ["barrier", "end_training", "reset"])
    rt.close()
    assert len(events) == (2 if raise_inside else 3)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_train_eval_and_bench_start_through_the_runtime():
    """Each entry point starts its runtime in one place and leaves through its teardown."""
    import inspect

    from mmpretrain.evaluation import cli as eval_cli
    from mmpretrain.models import bench
    from mmpretrain.trainer import accel, loop

    assert "runtime.start_accelerator(" in inspect.getsource(accel.start_runtime)
    assert "accel.start_runtime(accel.AcceleratorSpec.from_config(cfg), tcfg)" in inspect.getsource(loop.train) and "with runtime:" in inspect.getsource(loop.train)
    assert "start_if_launched()" in inspect.getsource(eval_cli.main) and "with runtime:" in inspect.getsource(eval_cli.main)
    assert "start_process_group(" in inspect.getsource(bench.main)


def test_check_accelerator_compares_with_the_launch():
    info = runtime.LaunchInfo(launched=True, world_size=2, use_deepspeed=False, has_gpu=False)
    with pytest.raises(runtime.LaunchError, match="Accelerate sees 1 process"):
        runtime.check_accelerator(SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name="NO")), info)
