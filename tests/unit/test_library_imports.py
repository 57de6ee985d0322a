"""The library stands alone, and the package has no import cycles.

Layers (docs/ARCHITECTURE.md, "Who may import whom"):

- config: ``mmpretrain.config`` (the tree) and the section modules ``mmpretrain/<pkg>/config.py``
  (dataclasses that import nothing but other config modules);
- library: everything users import — ``mmpretrain``, ``distributed``, ``losses``, ``models``,
  ``data``, ``export`` (format reader, towers, ``load_pretrained``/inference, its CLI);
- app: ``trainer``, ``evaluation``, ``cli``/``__main__``, ``train``, ``pipeline``, the bench
  scripts and ``mmpretrain shards`` (``data/cli.py``).

Static tests parse every module with ``ast``; module-level imports (run when the module is
imported; class bodies and module-level ``if``/``try`` included, ``if TYPE_CHECKING:`` not) and
function-level imports (run when the function is called) are collected apart. Dynamic tests
import the library in a fresh interpreter and look at ``sys.modules``.

``python tests/unit/test_library_imports.py`` prints the import report (function-level imports
per module, and the cycles they would add).
"""

from __future__ import annotations

import ast
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "mmpretrain"

# ----------------------------------------------------------------------------- layers

APP_PACKAGES = ("mmpretrain.trainer", "mmpretrain.evaluation")
APP_MODULES = {"mmpretrain.cli", "mmpretrain.__main__", "mmpretrain.train", "mmpretrain.pipeline",
               "mmpretrain.bench", "mmpretrain.models.bench", "mmpretrain.data.bench", "mmpretrain.data.cli",
               "mmpretrain.quality", "mmpretrain.runtime"}
FORBIDDEN_THIRD_PARTY = ("accelerate", "deepspeed")
# (module, third-party package): the library's only such import, function-level: consolidating a
# DeepSpeed ZeRO checkpoint needs DeepSpeed's own zero_to_fp32 (only for such a checkpoint).
ALLOWED_THIRD_PARTY = {("mmpretrain.export.format", "deepspeed")}

# Cycles that function-level imports add, known and owned elsewhere. Remove an entry once fixed.
KNOWN_MODULE_CYCLES: set[frozenset[str]] = set()
KNOWN_PACKAGE_CYCLES = {
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def is_config(mod: str) -> bool:
    return mod == "mmpretrain.config" or (mod.endswith(".config") and mod.count(".") == 2)


def is_app(mod: str) -> bool:
    if is_config(mod):
        return False
    return mod in APP_MODULES or any(mod == p or mod.startswith(p + ".") for p in APP_PACKAGES)


def is_library(mod: str) -> bool:
    return not is_app(mod) and not is_config(mod)


# ----------------------------------------------------------------------------- the import graph

Import = collections.namedtuple("Import", "source target line level")  # level: "module" | "function"


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _import_nodes(tree: ast.Module):
    """(node, level) for every import statement."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, "function" if in_function else "module"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # the body never runs
                    visit(ast.Module(body=[stmt], type_ignores=[]), in_function)
            else:
                visit(child, in_function)

    visit(tree, False)
    return found


def _resolve(source: str, node) -> list[str]:
    """Imported module names: for ``mmpretrain`` the nearest existing module of the package
    (``from pkg import sub`` is the submodule when there is one), otherwise the top-level name."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = source.split(".") if MODULES[source].name == "__init__.py" else source.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module
        names = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in MODULES else base_name for a in node.names]
    out = []
    for name in names:
        if name == "mmpretrain" or name.startswith("mmpretrain."):
            while name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
        else:
            name = name.split(".")[0]
        if name != source and name not in out:
            out.append(name)
    return out


def _all_imports() -> list[Import]:
    out = []
    for mod, path in MODULES.items():
        for node, level in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            out += [Import(mod, t, node.lineno, level) for t in _resolve(mod, node)]
    return out


IMPORTS = _all_imports()


def _internal(levels=("module",)) -> list[Import]:
    return [i for i in IMPORTS if i.target in MODULES and i.level in levels]


def _unit(mod: str) -> str:
    """The package-level node of a module: ``mmpretrain.<first part>``; a config section is its
    own node (a leaf: see test_config_sections_are_leaves)."""
    if is_config(mod):
        return mod
    return ".".join(mod.split(".")[:2])


def cycles(edges) -> list[frozenset[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    graph = collections.defaultdict(set)
    for a, b in edges:
        if a != b:
            graph[a].add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(set(graph) | {b for bs in graph.values() for b in bs}):
        if v not in index:
            visit(v)
    return found


def _explain(comp: frozenset[str], imports: list[Import], unit=lambda m: m) -> str:
    lines = [f"cycle among {sorted(comp)}:"]
    for i in imports:
        if unit(i.source) in comp and unit(i.target) in comp and unit(i.source) != unit(i.target):
            lines.append(f"  {i.source} -> {i.target} ({i.level}-level, line {i.line})")
    return "\n".join(lines)


def report() -> str:
    lines = ["function-level imports of mmpretrain modules, per module:"]
    per = collections.Counter(i.source for i in IMPORTS if i.level == "function" and i.target in MODULES)
    lines += [f"  {n:3d}  {m}" for m, n in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))]
    every = _internal(("module", "function"))
    for comp in cycles((i.source, i.target) for i in every):
        lines.append(_explain(comp, every))
    for comp in cycles((_unit(i.source), _unit(i.target)) for i in every):
        lines.append("(packages) " + _explain(comp, every, _unit))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- static tests

def test_the_graph_sees_the_known_imports():
    """Guard the parser itself: a few imports that must be found, at the right level."""
    got = {(i.source, i.target, i.level) for i in IMPORTS}
    assert ("mmpretrain.trainer.checkpoint", "mmpretrain.export.format", "module") in got
    assert ("mmpretrain.losses", "mmpretrain.distributed", "module") in got
    assert ("mmpretrain.export.format", "deepspeed", "function") in got
    assert ("mmpretrain.trainer.loop", "mmpretrain.evaluation.evaluate", "function") in got


def test_no_import_cycle_among_module_level_imports():
    edges = _internal(("module",))
    found = cycles((i.source, i.target) for i in edges)
    assert not found, "\n".join(_explain(c, edges) for c in found)


def test_no_import_cycle_between_packages_at_module_level():
    edges = _internal(("module",))
    found = cycles((_unit(i.source), _unit(i.target)) for i in edges)
    assert not found, "\n".join(_explain(c, edges, _unit) for c in found)


def test_function_level_imports_add_only_the_known_cycles():
    """Function-level imports are reported apart: with them, the only cycles are the known ones
    (each with its owner in KNOWN_*_CYCLES); a new one fails here."""
    every = _internal(("module", "function"))
    new = [c for c in cycles((i.source, i.target) for i in every) if c not in KNOWN_MODULE_CYCLES]
    assert not new, "\n".join(_explain(c, every) for c in new)
    new = [c for c in cycles((_unit(i.source), _unit(i.target)) for i in every) if c not in KNOWN_PACKAGE_CYCLES]
    assert not new, "\n".join("(packages) " + _explain(c, every, _unit) for c in new)


def test_config_sections_are_leaves():
    """Section modules import only config modules, so treating each as its own node in the
    package graph hides no cycle."""
    bad = [i for i in IMPORTS if is_config(i.source) and i.target in MODULES and not is_config(i.target)]
    assert not bad, bad


def test_library_never_imports_the_app_or_accelerate():
    """No library module imports the trainer, evaluation or a command (module- or function-level),
    nor Accelerate/DeepSpeed (except ALLOWED_THIRD_PARTY)."""
    bad = []
    for i in IMPORTS:
        if not is_library(i.source):
            continue
        if i.target in MODULES and is_app(i.target):
            bad.append(i)
        elif i.target in FORBIDDEN_THIRD_PARTY and (i.source, i.target) not in ALLOWED_THIRD_PARTY:
            bad.append(i)
    assert not bad, "\n".join(f"{i.source} -> {i.target} ({i.level}-level, line {i.line})" for i in bad)


# ----------------------------------------------------------------------------- dynamic tests

FORBIDDEN_PREFIXES = ("mmpretrain.trainer", "mmpretrain.evaluation", "accelerate", "deepspeed")
FORBIDDEN_EXACT = ("mmpretrain.cli", "mmpretrain.train", "mmpretrain.pipeline", "mmpretrain.bench")

_PROBE = r"""
import json, sys
FORBIDDEN_PREFIXES = %r
FORBIDDEN_EXACT = %r

def offenders():
    return sorted(k for k in sys.modules if k in FORBIDDEN_EXACT
                  or any(k == p or k.startswith(p + ".") for p in FORBIDDEN_PREFIXES))

result = {}
def check(step):
    bad = [k for k in offenders() if not any(k in v for v in result.values())]
    if bad:
        result[step] = bad
""" % (FORBIDDEN_PREFIXES, FORBIDDEN_EXACT)


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE + code + "\nprint(json.dumps(result))"],
                          capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LIBRARY_MODULES = sorted(m for m in MODULES if is_library(m) and not m.endswith("__main__"))


def test_importing_the_library_loads_no_trainer_cli_or_accelerate():
    """Every library module, imported in turn in a fresh interpreter: after each import,
    ``sys.modules`` holds no ``mmpretrain.trainer*``, evaluation, command, Accelerate or DeepSpeed
    module (what appears is charged to the import that brought it)."""
    assert {"mmpretrain", "mmpretrain.models", "mmpretrain.losses", "mmpretrain.export",
            "mmpretrain.export.format", "mmpretrain.export.inference"} <= set(LIBRARY_MODULES)
    code = "import importlib\n" + "".join(
        f"importlib.import_module({m!r}); check('import {m}')\n" for m in LIBRARY_MODULES)
    code += "import mmpretrain; mmpretrain.load_pretrained; check('mmpretrain.load_pretrained')\n"
    assert _run(code) == {}


TINY = ["model.image_size=32", "data.image_size=32", "model.width=32", "model.depth=2", "model.num_heads=2",
        "model.embed_dim=16", "model.patch_size=8", "model.max_text_length=16", "data.max_length=16"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint laid out as the trainer writes it (without the trainer: weights, metadata,
    tokenizer) and its export."""
    from safetensors.torch import save_file

    from mmpretrain.config import load_config, to_dict
    from mmpretrain.data.tokenizer import train_tokenizer
    from mmpretrain.export import CKPT_FORMAT, export_checkpoint
    from mmpretrain.models import build_model

    root = tmp_path_factory.mktemp("library")
    cfg = load_config(None, TINY)
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    captions = ["a red circle left of a blue square", "two green stars", "a small yellow triangle"] * 4
    tok = train_tokenizer(captions, str(ckpt / "tokenizer"), 120)
    model = build_model(cfg.model, cfg.loss, len(tok))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "mmpretrain.json").write_text(json.dumps(
        {"format": CKPT_FORMAT, "step": 1, "config": to_dict(cfg), "vocab_size": len(tok),
         "distributed_type": "NO", "zero_stage": 0, "world_size": 1}))
    return ckpt, export_checkpoint(ckpt, root / "export")


def test_inference_on_an_export_loads_no_trainer_cli_or_accelerate(exported):
    """``mmpretrain.load_pretrained`` and the inference API, used as a downstream user would."""
    _, out = exported
    code = f"""
import torch
import mmpretrain
p = mmpretrain.load_pretrained({str(out)!r}); check('load_pretrained')
img = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
assert p.embed_images(img).shape == (2, 16); check('embed_images')
assert p.embed_texts(['a red circle', 'two stars']).shape == (2, 16); check('embed_texts')
assert p.score_pairs(img, ['a red circle', 'two stars']).shape == (2,); check('score_pairs')
"""
    assert _run(code) == {}


# ``mmpretrain.config`` (the tree a checkpoint's config is parsed into) imports every section,
# among them trainer/config.py (TrainConfig, OptimConfig) and evaluation/config.py: dataclass
# modules that import nothing. Until those sections move out of the app packages, rebuilding a
# checkpoint's config loads them (and their empty package __init__), and nothing else of the app.
CONFIG_SECTIONS_IN_APP = {"mmpretrain.trainer", "mmpretrain.trainer.config", "mmpretrain.evaluation",
                          "mmpretrain.evaluation.config"}


def test_loading_a_checkpoint_loads_only_the_config_sections_of_the_app(exported):
    ckpt, out = exported
    code = f"""
from mmpretrain.export import load_checkpoint, read_checkpoint, read_meta
read_meta({str(ckpt)!r}, required={{}}); read_checkpoint({str(ckpt)!r}); check('read_checkpoint')
load_checkpoint({str(ckpt)!r}); check('load_checkpoint(checkpoint)')
load_checkpoint({str(out)!r}); check('load_checkpoint(export)')
"""
    result = _run(code)
    assert "read_checkpoint" not in result, result
    loaded = {m for mods in result.values() for m in mods}
    assert loaded <= CONFIG_SECTIONS_IN_APP, result


if __name__ == "__main__":
    print(report())
