"""One typed config tree, loaded from YAML with dotted command-line overrides.

Each component owns its dataclass (``mmpretrain/data/config.py`` and so on) and receives only
its own section, or a small spec derived from the tree. This module only assembles the tree,
reads YAML, applies ``a.b=value`` overrides and validates: an unknown key is an error that names
the key and suggests the nearest valid one; a value outside a field's ``Literal`` choices names
the key and the choices.

Facts that two sections hold (``LINKS``: the image side, the text length) are kept consistent
here and only here: a YAML file or the overrides that set one side only set the other to the same
value, and a tree whose two sides disagree is a ``ConfigError`` naming both keys.

Renamed keys (``RENAMED``: ``data.batch_size`` -> ``data.global_batch_size``) still read, here and
only here, in every tree a config is read from (a YAML file, the overrides, the config a checkpoint
or a run directory saved), with one ``FutureWarning`` naming both keys; the old and the new key
both set to different values is a ``ConfigError`` naming both.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from mmpretrain.data.config import DataConfig
from mmpretrain.evaluation.config import EvalConfig
from mmpretrain.models.config import LossConfig, ModelConfig
from mmpretrain.trainer.config import OptimConfig, TrainConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0
    """Global seed: data order, init, ITM negative sampling."""

    source = None
    """Not a field (never dumped, compared or saved): the config file ``load_config`` read the
    tree from, which ``config_error`` names; None for the defaults or a tree of a dict."""


# ----------------------------------------------------------------------------- helpers

def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a dataclass tree, e.g. ``data.global_batch_size``."""
    keys = []
    for f in dataclasses.fields(cls):
        t = _resolve(cls, f)
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _resolve(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


# Leaf names people carry over from other trainers -> ours (matched before spelling distance,
# which would send ``optim.learning_rate`` to ``optim.min_lr_ratio``).
_SYNONYMS = {
    "learning_rate": "lr", "learningrate": "lr", "wd": "weight_decay", "decay": "weight_decay",
    "bs": ("global_batch_size", "batch_size"), "batchsize": ("global_batch_size", "batch_size"),
    "batch_size": "global_batch_size", "global_batch": "global_batch_size", "global_bs": "global_batch_size",
    "warmup": "warmup_steps", "steps": "max_steps", "num_steps": "max_steps", "total_steps": "max_steps",
    "clip_grad": "grad_clip", "max_grad_norm": "grad_clip", "grad_norm": "grad_clip",
}


def _by_words(key: str, candidates: list[str]) -> str | None:
    """A candidate the key names by a known synonym or by the initials of its words
    (``learning_rate`` -> ``lr``), preferring the key's own section."""
    section, _, leaf = key.rpartition(".")
    words = [w for w in re.split(r"[_\-]+", leaf.lower()) if w]
    synonym = _SYNONYMS.get(leaf.lower()) or ()
    wanted = [synonym] if isinstance(synonym, str) else list(synonym)
    if len(words) > 1:
        wanted.append("".join(w[0] for w in words))
    hits = {name: [c for c in candidates if c.rsplit(".", 1)[-1] == name] for name in wanted}
    for name in wanted:  # the key's own section first (``eval.bs`` -> ``eval.batch_size``)
        same = [c for c in hits[name] if c.rpartition(".")[0] == section]
        if same:
            return same[0]
    for name in wanted:
        if len(hits[name]) == 1:
            return hits[name][0]
    return None


def _suggest(key: str, candidates: list[str]) -> str:
    named = _by_words(key, candidates)
    if named:
        return f"; did you mean '{named}'?"
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try matching the last component only (typo in the leaf)
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f"; did you mean '{close[0]}'?" if close else ""


_TRUE, _FALSE = ("yes", "on", "true"), ("no", "off", "false")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads a bare no/off/false (yes/on/true) as a boolean: `train.mixed_precision=no`
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (_TRUE if value else _FALSE)]
            if len(spelled) == 1:
                return spelled[0]
        if isinstance(value, (dict, list)) or value not in args:
            names = [str(a) for a in args]
            close = [n for n in names if str(value) and n.startswith(str(value))] or \
                difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
            read = " (YAML reads a bare yes/no/on/off as a boolean)" if isinstance(value, bool) else ""
            raise ConfigError(f"{key}: {value!r}{read} is not one of {', '.join(repr(a) for a in args)}"
                              + (f"; did you mean {close[0]!r}?" if len(close) == 1 else ""))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        k = prefix + str(unknown[0])
        raise ConfigError(f"unknown config key '{k}'" + _suggest(k, all_keys(Config)))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, _resolve(cls, names[name]), prefix + name)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


def literal_choices(cls: type = Config, prefix: str = "") -> dict[str, tuple]:
    """Dotted key -> the allowed values, for every ``Literal`` field of the tree."""
    out: dict[str, tuple] = {}
    for f in dataclasses.fields(cls):
        t = _resolve(cls, f)
        if dataclasses.is_dataclass(t):
            out.update(literal_choices(t, prefix + f.name + "."))
        elif typing.get_origin(t) is typing.Literal:
            out[prefix + f.name] = typing.get_args(t)
    return out


# ----------------------------------------------------------------------------- renamed keys

RENAMED = {
    "data.batch_size": "data.global_batch_size",  # it is the global batch of one micro-step
}
"""Old dotted key -> its new name in the same section. The old one still reads everywhere a config is read (YAML,
overrides, a saved run's config.yaml or checkpoint config), with one ``FutureWarning``."""


_RENAME_WARNED: dict = {}  # the warnings registry of the renamed keys: each message once per process


def _warn_renamed(old: str, new: str, value: Any, where: str = "") -> None:
    """One ``FutureWarning`` line naming both keys (no source line under it: it is the config's)."""
    warnings.warn_explicit(f"{where}{old} is deprecated: renamed {new}, read as {new}={value!r}; write {new}",
                           FutureWarning, filename="mmpretrain config", lineno=0, module="mmpretrain.config",
                           registry=_RENAME_WARNED)


def _both_set(old: str, new: str, old_value: Any, new_value: Any, where: str = "") -> ConfigError:
    return ConfigError(f"{where}{old}={old_value!r} and {new}={new_value!r} are both set and differ "
                       f"({old} is the old name of {new}); set {new} alone")


def _renamed(tree: dict, where: str = "") -> dict:
    """``tree`` (one YAML file, a saved config) with every old key of ``RENAMED`` under its new
    name, in its place; a ``FutureWarning`` for each old key found. Copies the sections it changes."""
    out = tree
    for old, new in RENAMED.items():
        (has_old, old_value), (has_new, new_value) = _get_dotted(out, old), _get_dotted(out, new)
        if not has_old:
            continue
        if has_new and new_value != old_value:
            raise _both_set(old, new, old_value, new_value, where)
        _warn_renamed(old, new, old_value, where)
        (section, old_leaf), new_leaf = old.split("."), new.split(".")[1]  # one section: a new leaf name
        out = {**out, section: {(new_leaf if k == old_leaf else k): v for k, v in out[section].items()
                                if not (has_new and k == new_leaf)}}
    return out


# ----------------------------------------------------------------------------- cross-section facts

@dataclasses.dataclass(frozen=True)
class Link:
    """One fact two sections hold: ``first`` equals ``second`` (``"=="``) or is at most it (``"<="``)."""

    first: str
    second: str
    relation: str
    what: str

    def holds(self, a: Any, b: Any) -> bool:
        return a == b if self.relation == "==" else a <= b


LINKS = (
    Link("model.image_size", "data.image_size", "==", "the image side the model is built for and the loader crops to"),
    Link("data.max_length", "model.max_text_length", "<=", "the tokenized text length and the model's text positions"),
)


def _leaf_type(key: str) -> Any:
    section, leaf = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(cls)[leaf]


def _get_dotted(tree: dict, key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _follow(layer: dict) -> dict:
    """``layer`` (one YAML file, or the overrides) with the other side of every link it sets on
    one side only set to the same value. Copies the sections it changes; the input stays as it was."""
    out = dict(layer)
    for link in LINKS:
        (has_a, a), (has_b, b) = _get_dotted(out, link.first), _get_dotted(out, link.second)
        if has_a != has_b:
            (source, key), value = ((link.first, link.second), a) if has_a else ((link.second, link.first), b)
            try:
                _coerce(value, _leaf_type(source), source)
            except ConfigError:
                continue  # a bad value: the key that was set reports it
            section, leaf = key.split(".")
            if not isinstance(out.get(section, {}), dict):
                continue  # a non-mapping section: _build names it
            out[section] = {**out.get(section, {}), leaf: value}
    return out


def check_links(cfg: Config) -> None:
    """``ConfigError`` (one line, both keys) when the two sides of a link disagree."""
    for link in LINKS:
        a = getattr(getattr(cfg, link.first.split(".")[0]), link.first.split(".")[1])
        b = getattr(getattr(cfg, link.second.split(".")[0]), link.second.split(".")[1])
        if not link.holds(a, b):
            rule = "must be equal" if link.relation == "==" else f"{link.first} must not exceed {link.second}"
            raise ConfigError(f"{link.first}={a} and {link.second}={b} disagree ({link.what}: {rule}); "
                              "set one of them alone and the other follows")


def _with_links(tree: dict) -> Config:
    cfg = _build(Config, tree)
    check_links(cfg)
    return cfg


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def expand_key(key: str) -> str:
    """Full dotted name for an override key; a bare leaf (``max_steps``) is accepted when it
    names exactly one field of the tree, or the two sides of one link (``image_size``)."""
    keys = all_keys(Config)
    if key in keys or key in RENAMED:
        return key  # an old name: ``parse_overrides`` reads it as the new one
    sections = {k.split(".", 1)[0] for k in keys if "." in k}
    if key in sections:
        raise ConfigError(f"override '{key}' names a whole section; set one of its keys")
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if key in {old.rsplit(".", 1)[-1] for old in RENAMED}:  # bare ``batch_size``: the old data key too
        matches += [new for old, new in RENAMED.items() if old.rsplit(".", 1)[-1] == key and new not in matches]
    if len(matches) == 1:
        return matches[0]
    for link in LINKS:  # ``image_size=96``: both sides of a link (the other follows)
        if sorted(matches) == sorted((link.first, link.second)):
            return link.first
    if len(matches) > 1:
        raise ConfigError(f"override key '{key}' is ambiguous: one of {matches}")
    raise ConfigError(f"unknown config key '{key}'" + _suggest(key, keys))


def _split_top_level(text: str) -> list[str]:
    """``a, b-{0,1}, 'c'`` -> the items at brace/bracket depth 0 (quotes kept whole)."""
    items, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items]


def _override_value(raw: str) -> Any:
    """An override's value: YAML, except where YAML reads brace patterns as flow collections
    (``{000000..000003}``, ``[http://h/x-{0..3}.tar]``): a plain string, or a list of items split
    at top-level commas, each item YAML or, when YAML fails on it, the plain string."""
    if raw.strip() == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None
        failed = True
    else:
        failed = False
    text = raw.strip()
    if text.startswith("[") and text.endswith("]") and (failed or "{" in text):
        out = []
        for item in _split_top_level(text[1:-1]):
            if item == "":
                continue
            try:
                out.append(yaml.safe_load(item) if "{" not in item else item)
            except yaml.YAMLError:
                out.append(item)
        return [v[1:-1] if isinstance(v, str) and len(v) > 1 and v[0] == v[-1] and v[0] in "'\"" else v
                for v in out]
    if failed or (isinstance(value, dict) and "{" in text and ":" not in text):
        return text  # a brace pattern, not a mapping (``{a,b}.tar``, ``x-{0..3}.tar``)
    return value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``(full dotted key, value)`` of each ``key=value``; an old key (``RENAMED``) under its new
    name, with a ``FutureWarning``, and set beside its new name to another value a ``ConfigError``."""
    out, old_names = [], []
    spelled: dict[str, tuple[str, Any]] = {}  # key -> (the name it was last set by, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        name = expand_key(key.strip())
        value = _override_value(raw)
        key = RENAMED.get(name, name)
        before = spelled.get(key)
        if before is not None and before[0] != name and before[1] != value:  # the old and the new name
            (old, old_value), (_, new_value) = sorted([before, (name, value)], key=lambda nv: nv[0] not in RENAMED)
            raise _both_set(old, key, old_value, new_value)
        spelled[key] = (name, value)
        old_names += [(name, key, value)] if name in RENAMED else []
        out.append((key, value))
    for name, key, value in old_names:  # after the checks: an error is the only line
        _warn_renamed(name, key, value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = _renamed(tree, f"{p}: ")
    layer: dict = {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(layer, key, value)
    tree, layer = _follow(tree), _follow(layer)  # each sets the other side of what it sets alone
    for key in all_keys(Config):
        found, value = _get_dotted(layer, key)
        if found:
            _set_dotted(tree, key, value)
    try:
        cfg = _with_links(tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg.source = str(path) if path else None  # not a field: never dumped, compared or saved
    return cfg


def config_error(cfg: Config, message: Any, kind: type[Exception] = ConfigError) -> Exception:
    """A ``ConfigError`` for a value of ``cfg`` found bad after loading (a start-up check), named
    the way ``load_config`` names its own errors: ``FILE: message``, ``FILE`` the config file the
    tree was read from (``Config.source``; nothing for a tree of the defaults or of a dict).
    ``kind``: another exception class for the same message (``FileNotFoundError`` for shards
    that match no file)."""
    source = getattr(cfg, "source", None)
    return kind(f"{source}: {message}" if source else str(message))


def config_from_dict(tree: dict) -> Config:
    """The typed tree of a plain dict (a checkpoint's config), checked as ``load_config`` checks
    (an old key of ``RENAMED`` reads as its new one, with a ``FutureWarning``)."""
    return _with_links(_follow(_renamed(tree, "saved config: ")))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- documentation

def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _inline(value: Any) -> str:
    """One-line YAML of a value."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def describe_config(cfg: Any, prefix: str = "", width: int = 100) -> str:
    """Every key of ``cfg`` with its value, its default when the value differs, its allowed
    values (``Literal`` fields) and its docstring, as YAML (the docs as comments): ``mmpretrain
    train --print-config``. The whole tree starts with the links between sections."""
    lines: list[str] = []
    cls = type(cfg)
    if cls is Config and not prefix:
        head = ["Every key with its value; above it, in brackets, its default (where the value differs) and "
                "its allowed values, then its meaning."]
        for link in LINKS:
            rule = "=" if link.relation == "==" else "<="
            head.append(f"{link.first} {rule} {link.second} ({link.what}): set one alone, the other follows.")
        lines += [f"# {chunk}" for text in head for chunk in textwrap.wrap(text, width - 2)]
    docs, defaults = field_docs(cls), cls()
    indent = "  " * prefix.count(".")
    for f in dataclasses.fields(cls):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.append(describe_config(value, prefix + f.name + ".", width))
            continue
        doc = docs.get(f.name, "")
        notes = [f"default {_inline(default)}"] if value != default else []
        tp = _resolve(cls, f)
        if typing.get_origin(tp) is typing.Literal:
            notes.append("one of " + " | ".join(_inline(a) for a in typing.get_args(tp)))
        if notes:
            doc = f"({'; '.join(notes)}) " + doc
        if doc:
            for chunk in textwrap.wrap(doc, max(40, width - len(indent) - 2)):
                lines.append(f"{indent}# {chunk}")
        rendered = f"{f.name}: {_inline(value)}"
        if len(rendered) > width:  # e.g. a filled-in token table
            rendered = rendered[:width - 5] + " ..."
        lines.append(f"{indent}{rendered}")
    return "\n".join(lines)
