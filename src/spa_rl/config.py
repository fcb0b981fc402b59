"""Settings: one dataclass per stage, and the one way a command line, a TOML file and overrides reach it.

The convention:
- A stage's settings are one dataclass derived from `Config` (`CollectConfig`, `SFTConfig`, `EvalConfig`, ...),
  composed of shared parts (`ModelConfig`: model, device, dtype; `RolloutConfig` with its `SamplingConfig`;
  `LoRAConfig`; `LogConfig`). Every field is documented by the docstring under it, which is also its `--help`
  text (the first paragraph). `setting(...)` declares what the command line and the checks need: a range
  (`ge`, `gt`, `le`, `lt`), another flag name, a positional argument, whether a resumed run may change it.
- `Config.__post_init__` checks every field's choices (a `Literal` type) and range (numbers must be finite),
  then calls the class's `check()` for settings that cannot work together; both raise `SpaError` naming the
  settings. So a config built from Python gets the same checks as one from the command line (the command line
  and config files also check types; Python callers get Python's).
- `add_arguments(parser, cls)` generates the flags: `--name` for each setting whose name is unique in the
  config's tree (`--max-new-tokens` sets `rollout.sampling.max_new_tokens`); the others are reached with `--set`.
- Precedence, lowest first: the dataclass defaults, `--config FILE` (TOML, or a stage's `config.json`),
  `--set KEY=VALUE` (repeatable), explicit flags. A key is a dotted path or any unique suffix of one
  (`rollout.sampling.temperature`, `sampling.temperature`, `temperature`).
- A stage's output directory holds its resolved config (`spa_rl.outputs.claim_output`), against which a rerun is
  checked (`diff`, ignoring the `volatile` settings).

Why our own module instead of a library: `HfArgumentParser` reads help from field metadata, not from the
docstrings where our fields are documented, and has no nested dataclasses. `tyro` has both (and drops the
prefixes of nested flags with one marker), and would generate the flags; what it does not do is resolve TOML keys
and `--set` overrides by any unique suffix of their path (`temperature` for `rollout.sampling.temperature`), nor
give the stored config that a resumed directory is checked against. Those are most of this module, so it stays
ours, on argparse.

This module must never know about a particular stage: it only moves settings around and checks them.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import fnmatch
import functools
import inspect
import itertools
import json
import math
import textwrap
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from spa_rl.errors import SpaError

"""The file in every stage's output directory: which stage made it and its fully resolved settings."""


def setting(default: Any = MISSING, *, factory: Any = MISSING, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, flag: str | None = None, positional: bool = False,
            volatile: bool = False, repeat: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field with what the CLI and the checks need.

    `ge`/`gt`/`le`/`lt`: the allowed range. `flag`: the flag's name if not `--field-name` (for a bool whose
    default is True, a flag that turns it off, e.g. `--no-filter`). `positional`: a positional argument.
    `volatile`: a resumed run may change it (logging sinks), so it is not compared on resume. `repeat`: a list
    given by repeating the flag.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "positional": positional, "volatile": volatile,
            "repeat": repeat, "metavar": metavar}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class Config:
    """Base of every settings dataclass: checks choices and ranges, then `check()`."""

    hidden: typing.ClassVar[tuple[str, ...]] = ()
    """Dotted paths (or `*` patterns) of nested settings this config fills in itself (no flag, not settable)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            _check_value(f, hints[f.name], getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Cross-field checks of this config (raise `SpaError` naming the clashing settings)."""

    @classmethod
    def make(cls, settings: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Build from settings named by dotted path or unique suffix: `SFTConfig.make(data=d, out=o, lr=1e-5)`,
        `EvalConfig.make({"sampling.temperature": 0.7, "env": "sokoban"})`."""
        values: dict[tuple[str, ...], Any] = {}
        for key, value in {**(settings or {}), **kw}.items():
            if is_dataclass(value) and not isinstance(value, type):  # a whole nested part, e.g. model=ModelConfig()
                values[_part(cls, key)] = value
            else:
                path = resolve(cls, key)
                values[path] = coerce(leaf_of(cls, path), value, key)
        return build(cls, values)


@dataclass(kw_only=True)
class Seeded(Config):
    """A config with a seed (every stage)."""

    seed: int = setting(0, ge=0)
    """Random seed: the same seed and settings give the same puzzles, samples and data order."""


# ------------------------------------------------------------------------------------------ introspection
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field (attribute docstrings, read from the source of the class and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _nested_type(tp: Any) -> type | None:
    """The Config class of a nested settings field, else None."""
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclass(frozen=True)
class Leaf:
    """A setting that is not itself a nested config: where it lives and what it accepts."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any
    doc: str
    default: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def meta(self) -> Any:
        return self.field.metadata


def leaves(cls: type, instance: Any = None, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf setting of `cls`, depth first, with its default (taken from nested parts' default instances,
    so a parent's `factory=lambda: CollectConfig(..., puzzles=32)` shows 32)."""
    out = []
    hints, docs = _hints(cls), field_docs(cls)
    for f in fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name) if instance is not None else _default(f)
        nested = _nested_type(tp)
        if nested is not None:
            out += leaves(nested, None if value is MISSING else value, (*prefix, f.name))
        else:
            out.append(Leaf((*prefix, f.name), f, tp, docs.get(f.name, ""), value))
    return out


@functools.cache
def _hidden(cls: type) -> frozenset[str]:
    """Dotted paths hidden by `cls` and by the nested configs inside it (prefixed)."""
    out = set(getattr(cls, "hidden", ()))
    hints = _hints(cls)
    for f in fields(cls):
        nested = _nested_type(hints[f.name])
        if nested is not None:
            out |= {f"{f.name}.{h}" for h in _hidden(nested)}
    return frozenset(out)


def _is_hidden(key: str, hidden: frozenset[str]) -> bool:
    """Whether `key` or a part containing it is hidden (patterns may use `*`: `*.out` hides every stage's out)."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, h) for p in prefixes for h in hidden)


def _visible(cls: type) -> list[Leaf]:
    hidden = _hidden(cls)
    return [lf for lf in leaves(cls) if not _is_hidden(lf.key, hidden)]


def _part(cls: type, key: str) -> tuple[str, ...]:
    """The path of the nested config field named by the dotted path `key` (exactly), or a one-line error."""
    path, current = tuple(key.split(".")), cls
    for name in path:
        tp = {f.name: _hints(current)[f.name] for f in fields(current)}.get(name)
        current = _nested_type(tp) if tp is not None else None
        if current is None:
            raise SpaError(f"{key!r} is not a nested part of {cls.__name__}")
    return path


def leaf_of(cls: type, path: tuple[str, ...]) -> Leaf:
    """The setting at `path` of `cls` (a path `resolve` returned)."""
    return next(lf for lf in leaves(cls) if lf.path == path)


def _names(parts: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Whether a key's parts name `path`: the last part is the setting, the others appear in order before it
    (`collect.dtype` names `collect.model.dtype`)."""
    if not parts or parts[-1] != path[-1]:
        return False
    it = iter(path[:-1])
    return all(p in it for p in parts[:-1])


def resolve(cls: type, key: str) -> tuple[str, ...]:
    """The path of the setting named `key` (a dotted path, a unique suffix of one, or its components in order
    with some left out, as `collect.dtype` for `collect.model.dtype`), or a one-line error."""
    parts = tuple(p.replace("-", "_") for p in key.strip().split("."))
    visible = _visible(cls)
    matches = [lf.path for lf in visible if _names(parts, lf.path)]
    exact = [m for m in matches if m[-len(parts):] == parts]  # `sampling.temperature` over `x.sampling.y.temperature`
    matches = exact if len(exact) == 1 else matches
    if not matches and len(parts) == 1:  # a flag's own name: `lora` for `lora.enabled` (--lora)
        matches = [lf.path for lf in visible if lf.meta.get("flag") and not lf.meta["flag"].startswith("--no-")
                   and lf.meta["flag"].lstrip("-").replace("-", "_") == parts[0]]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SpaError(f"setting {key!r} is ambiguous: say which of {', '.join('.'.join(m) for m in matches)}")
    names = sorted({lf.key for lf in visible} | {lf.path[-1] for lf in visible})
    near = difflib.get_close_matches(".".join(parts), names, n=3)
    hint = (f" (did you mean {' or '.join(near)}?)" if near
            else f"; valid settings: {', '.join(lf.key for lf in visible)}")
    raise SpaError(f"unknown setting {key!r}{hint}")


# ------------------------------------------------------------------------------------------ values
def _type_name(tp: Any) -> str:
    base, optional = _optional(tp)
    if get_origin(base) is Literal:
        name = " | ".join(repr(a) for a in get_args(base))
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or none" if optional else name


def _describe_range(meta: Any) -> str:
    parts = [f"{op} {meta[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta.get(k) is not None]
    return " and ".join(parts)


def coerce(leaf: Leaf, value: Any, where: str) -> Any:
    """`value` (from TOML, JSON, Python or the command line as text) as the type of `leaf`, or a one-line error
    naming `where` it came from and what is allowed."""
    base, optional = _optional(leaf.type)
    text = value if isinstance(value, str) else None

    def bad(what: str = "") -> SpaError:
        allowed = _type_name(leaf.type)
        return SpaError(f"{where}: {value!r} is not a valid {leaf.key} ({what or 'expected ' + allowed})")

    if value is None or (text is not None and text.strip().lower() in ("none", "null") and optional
                         and base is not str):
        if optional:
            return None
        raise bad()
    if get_origin(base) is Literal:
        choices = get_args(base)
        if value in choices:
            return value
        raise SpaError(f"{where}: {value!r} is not a valid {leaf.key}: choose one of {', '.join(map(str, choices))}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text.strip().lower() in ("true", "1", "yes", "on")
        raise bad("expected true or false")
    if base in (int, float):
        if isinstance(value, int if base is int else int | float) and not isinstance(value, bool):
            return base(value)
        if text is not None:
            try:
                return base(text.strip())
            except ValueError:
                pass
        raise bad("expected a whole number" if base is int else "expected a number")
    if base is str:
        if isinstance(value, str):
            return value
        raise bad("expected text")
    origin = get_origin(base) or base
    if origin in (tuple, list, dict):
        if text is not None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                if origin is dict:
                    raise bad("expected a JSON object") from None
                value = [v.strip() for v in text.split(",") if v.strip()]
        if origin is dict:
            if isinstance(value, dict):
                return dict(value)
            raise bad("expected a table")
        if not isinstance(value, list | tuple):
            raise bad("expected a list")
        args = [a for a in get_args(base) if a is not Ellipsis]
        if args:
            item = Leaf(leaf.path, leaf.field, args[0], leaf.doc, MISSING)
            value = [coerce(item, v, where) for v in value]
        if origin is tuple and get_args(base) and Ellipsis not in get_args(base) and len(value) != len(get_args(base)):
            raise bad(f"expected {len(get_args(base))} values")
        return tuple(value) if origin is tuple else list(value)
    return value


def _check_value(f: dataclasses.Field, tp: Any, value: Any) -> None:
    """Choices and range of one field's value (called by `Config.__post_init__`)."""
    base, optional = _optional(tp)
    if value is None:
        if optional or _nested_type(base) is not None:
            return
        raise SpaError(f"{f.name} must be set ({_type_name(tp)})")
    if get_origin(base) is Literal and value not in get_args(base):
        raise SpaError(f"{f.name}={value!r} is not allowed: choose one of {', '.join(map(str, get_args(base)))}")
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise SpaError(f"{f.name} must be a finite number, got {value}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        ok = all(((meta.get("ge") is None or value >= meta["ge"]), (meta.get("gt") is None or value > meta["gt"]),
                  (meta.get("le") is None or value <= meta["le"]), (meta.get("lt") is None or value < meta["lt"])))
        if not ok:
            raise SpaError(f"{f.name} must be {_describe_range(meta)}, got {value:g}")


# ------------------------------------------------------------------------------------------ building
def build(cls: type, values: dict[tuple[str, ...], Any], base: Any = None, prefix: tuple[str, ...] = ()) -> Any:
    """An instance of `cls` from `values` (path -> already coerced value) over the defaults (or over `base`)."""
    kwargs: dict[str, Any] = {}
    hints = _hints(cls)
    for f in fields(cls):
        path = (*prefix, f.name)
        nested = _nested_type(hints[f.name])
        current = getattr(base, f.name) if base is not None else _default(f)
        if path in values:
            kwargs[f.name] = values[path]
        elif nested is not None:
            if any(p[:len(path)] == path for p in values) or current is MISSING:
                kwargs[f.name] = build(nested, values, None if current is MISSING else current, path)
            else:
                kwargs[f.name] = current
        elif current is not MISSING:
            kwargs[f.name] = current
        else:
            flag = _flag_name(Leaf(path, f, hints[f.name], "", MISSING))
            raise SpaError(f"missing setting {'.'.join(path)}: pass {flag} VALUE (or set it in --config)")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def diff(old: dict, new: dict, ignore: set[str] = frozenset(), defaults: dict[str, Any] | None = None) -> list[str]:
    """`key: old -> new` for every setting that differs between two `to_dict` results (`ignore`: paths).
    `defaults` (dotted key -> default, as `defaults_of` gives): a setting missing from `old` and at its default in
    `new` is no change, since `old` was made by a version without the setting, which behaved as its default does
    (new settings default to the old behaviour)."""
    a, b, defaults = _flatten(old), _flatten(new), defaults or {}
    keys = sorted(k for k in set(a) | set(b) if not any(k == i or k.startswith(i + ".") for i in ignore))
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def defaults_of(cls: type) -> dict[str, Any]:
    """Dotted key -> default (as plain JSON data) of every leaf setting of `cls` that has one."""
    out = {}
    for lf in leaves(cls):
        if lf.default is not MISSING:
            try:
                out[lf.key] = json.loads(json.dumps(lf.default))
            except TypeError:  # not plain data: never taken as a default
                continue
    return out


def volatile_paths(cls: type) -> set[str]:
    return {lf.key for lf in leaves(cls) if lf.meta.get("volatile")}


def read_config_file(cls: type, path: str | Path) -> dict[tuple[str, ...], Any]:
    """The settings of a TOML file (tables nest: `[sampling]` then `temperature = 0.7`) or of a stage's
    `config.json`, resolved and coerced; unknown keys, wrong types and unreadable files are one-line errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpaError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
            data = data.get("config", data) if isinstance(data, dict) else data
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpaError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise SpaError(f"config file {path} must hold a table of settings")
    out: dict[tuple[str, ...], Any] = {}
    from_stage, hidden = path.suffix == ".json", _hidden(cls)

    def walk(table: dict, prefix: str) -> None:
        for k, v in table.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                try:  # a table is either a dict-valued setting or a group of settings
                    leaf = leaf_of(cls, resolve(cls, key))
                    if (get_origin(_optional(leaf.type)[0]) or _optional(leaf.type)[0]) is dict:
                        out[leaf.path] = coerce(leaf, v, f"{path} key {key}")
                        continue
                except SpaError:
                    pass
                walk(v, key)
                continue
            where = f"{path} key {key}"
            if from_stage and _is_hidden(key, hidden):
                continue  # filled in by the stage itself
            try:
                p = resolve(cls, key)
            except SpaError as e:
                raise SpaError(f"{path}: {e}") from None
            out[p] = coerce(leaf_of(cls, p), v, where)

    walk(data, "")
    return out


# ------------------------------------------------------------------------------------------ command line
def _flag_name(leaf: Leaf) -> str:
    if leaf.meta.get("flag"):
        return leaf.meta["flag"]
    name = leaf.path[-1].replace("_", "-")
    base, _ = _optional(leaf.type)
    if base is bool and leaf.default is True:
        return f"--no-{name}"
    return f"--{name}"


def _help(leaf: Leaf, required: bool = False) -> str:
    text = " ".join(leaf.doc.split("\n\n")[0].split()).replace("`", "")
    if required:
        return f"{text} (required)"
    if leaf.default is MISSING:
        return text
    base, _ = _optional(leaf.type)
    if base is bool:  # a setting that is on gets a flag that turns it off: say so unless its docstring does
        flag = _flag_name(leaf)
        return f"{text} (on; {flag} turns it off)" if leaf.default is True and flag not in text else text
    shown = json.dumps(leaf.default) if isinstance(leaf.default, list | tuple | dict) else leaf.default
    if shown == "":
        return text
    shown = "none" if shown is None else shown
    rng = _describe_range(leaf.meta)
    return f"{text} (default: {shown}{'; ' + rng if rng else ''})"


@dataclass
class Flags:
    """What `add_arguments` generated: argparse dest -> setting path."""

    cls: type
    dests: dict[str, tuple[str, ...]]
    required: dict[tuple[str, ...], str]
    """Settings the command line (or its --config / --set) must give: path -> flag."""


def add_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                  required: tuple[str, ...] = (), aliases: dict[str, str] | None = None) -> Flags:
    """Add a flag for every visible setting of `cls` with a unique name, plus `--config` and `--set`.

    `positional`: settings given as positional arguments; `required`: settings the command line must give
    (besides those without a default); `aliases`: dotted path -> the flag this command names it by (`spa train`
    calls `model.model` `--init`)."""
    visible = _visible(cls)
    if aliases:
        visible = [_renamed(lf, aliases[lf.key]) if lf.key in aliases else lf for lf in visible]
    def name(lf: Leaf) -> str:  # by setting name, not flag: `--x` and `--no-x` of two settings `x` would both exist
        return lf.meta.get("flag") or lf.path[-1]

    counts: dict[str, int] = {}
    for lf in visible:
        counts[name(lf)] = counts.get(name(lf), 0) + 1
    dests: dict[str, tuple[str, ...]] = {}
    must: dict[tuple[str, ...], str] = {}
    for lf in visible:
        flag = _flag_name(lf)
        if counts[name(lf)] > 1:
            continue  # two settings would answer to this flag: reachable with --set PATH=VALUE only
        dest = "cfg__" + "__".join(lf.path)
        dests[dest] = lf.path
        base, _ = _optional(lf.type)
        needed = lf.default is MISSING or lf.path[-1] in required
        if needed:
            must[lf.path] = flag
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(lf, needed)}
        if lf.path[-1] in positional or lf.meta.get("positional"):
            many = (get_origin(base) or base) is list
            item = Leaf(lf.path, lf.field, get_args(base)[0] if many and get_args(base) else base, lf.doc, MISSING)
            parser.add_argument(dest, metavar=lf.path[-1].upper(), help=_help(lf, required=True),
                                nargs="+" if many else None,
                                type=functools.partial(_from_text, item))
            continue
        if base is bool:
            kwargs["action"] = "store_false" if lf.default is True else "store_true"
        else:
            kwargs["type"] = functools.partial(_from_text, lf)
            if get_origin(base) is Literal:
                kwargs["choices"] = list(get_args(base))
                kwargs["type"] = str
            if lf.meta.get("repeat"):
                kwargs["action"] = "append"
                args = get_args(base)
                kwargs["type"] = functools.partial(_from_text, Leaf(lf.path, lf.field, args[0] if args else str,
                                                                    lf.doc, MISSING))
            kwargs["metavar"] = lf.meta.get("metavar") or (None if "choices" in kwargs
                                                           else flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", metavar="FILE", help="read settings from a TOML file (or a stage's config.json); "
                        "flags and --set override it")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override any setting by dotted path or unique suffix, e.g. --set "
                             "sampling.temperature=0.7 (repeatable; see --print-config for every key)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as JSON and exit")
    return Flags(cls, dests, must)


def _renamed(leaf: Leaf, flag: str) -> Leaf:
    """`leaf` under another flag name (its field copied, the original untouched)."""
    renamed = copy.copy(leaf.field)
    renamed.metadata = types.MappingProxyType({**leaf.meta, "flag": flag})
    return Leaf(leaf.path, renamed, leaf.type, leaf.doc, leaf.default)


def _from_text(leaf: Leaf, text: str) -> Any:
    try:
        return coerce(leaf, text, _flag_name(leaf))
    except SpaError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def from_args(args: argparse.Namespace, flags: Flags) -> Any:
    """The config the command line asks for: defaults < --config < --set < flags (see the module docstring)."""
    return build(flags.cls, args_values(args, flags))


def args_values(args: argparse.Namespace, flags: Flags) -> dict[tuple[str, ...], Any]:
    """The settings the command line gives (--config, then --set, then flags), by path, before any defaults: for
    commands that put another layer under them (`spa run`'s recipe and preset)."""
    cls = flags.cls
    values: dict[tuple[str, ...], Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(cls, args.config))
    for item in getattr(args, "set", None) or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SpaError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sampling.temperature=0.7")
        path = resolve(cls, key)
        values[path] = coerce(leaf_of(cls, path), text, f"--set {key}")
    for dest, path in flags.dests.items():
        if hasattr(args, dest):
            values[path] = getattr(args, dest)
    for path, flag in flags.required.items():
        if path not in values:
            raise SpaError(f"missing setting {'.'.join(path)}: pass {flag} (or set it in --config)")
    return values
