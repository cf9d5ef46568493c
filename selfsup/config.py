"""Run configs: defaults, reading ``config.yaml``, merging, and validating every value before any work.

A config is checked whole before anything is written: every key must exist (a misspelt one is named
with the closest valid name), and every value must have the type its consumer declares: a method's
constructor annotations for ``model``, :class:`~selfsup.data.datamodule.SelfSupDataModule`'s for
``data``, :data:`TRAINER_TYPES` for ``trainer``. A bad value is one :class:`~selfsup.errors.ConfigError`
line naming where it is (``model.lr``, or the file it came from) and what was expected, never a
traceback from deep inside training and never a value saved into ``config.yaml``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import ConfigError
from selfsup.runs import check_run_name

TRAINER_DEFAULTS: dict = {
    "max_epochs": 100,
    "max_steps": -1,
    "max_time": None,
    "accelerator": "auto",
    "devices": "auto",
    "num_nodes": 1,
    "strategy": "auto",
    "precision": "32-true",
    "accumulate_grad_batches": 1,
    "log_every_n_steps": 10,
    "check_val_every_n_epoch": 1,
    "fast_dev_run": 0,
}
TRAINER_TYPES: dict[str, str] = {
    "max_epochs": "int",
    "max_steps": "int",
    "max_time": "str | None",
    "accelerator": "str",
    "devices": "int | str | list[int]",
    "num_nodes": "int",
    "strategy": "str",
    "precision": "str | int",
    "accumulate_grad_batches": "int",
    "log_every_n_steps": "int",
    "check_val_every_n_epoch": "int | None",
    "fast_dev_run": "int | bool",
}
DATA_DEFAULTS: dict = {
    "data": "digits",
    "batch_size": 256,
    "num_workers": None,
    "image_size": None,
    "cache_dir": None,
    "skip_bad": False,
    "crop_pct": 0.875,
    "decode": "loader",
}
DATA_TYPES: dict[str, str] = {  # SelfSupDataModule's annotations of the DATA_DEFAULTS keys
    "data": "str",
    "batch_size": "int",
    "num_workers": "int | None",
    "image_size": "int | None",
    "cache_dir": "str | None",
    "skip_bad": "bool",
    "crop_pct": "float",
    "decode": "str",
}
KEEP_CHECKPOINTS = 2
"""Numbered checkpoints a run keeps besides ``last.ckpt`` (the newest; one more in case it is damaged)."""
TOP_LEVEL_TYPES: dict[str, str] = {
    "method": "str",
    "seed": "int",
    "output": "str",
    "name": "str | None",
    "online_probe": "bool",
    "tensorboard": "bool",
    "checkpoint_every": "int | None",
    "keep_checkpoints": "int",
    "verbose": "bool",
}
_MIN_VALUES = {  # smallest valid value of integer settings (-1: "no limit" where Lightning allows it)
    "trainer.max_epochs": -1, "trainer.max_steps": -1, "trainer.num_nodes": 1,
    "trainer.accumulate_grad_batches": 1, "trainer.log_every_n_steps": 1, "trainer.check_val_every_n_epoch": 1,
    "trainer.fast_dev_run": 0, "data.batch_size": 1, "data.num_workers": 0, "data.image_size": 1,
    "checkpoint_every": 1,
    "keep_checkpoints": 0,
}


def default_config(method: str = "rotation") -> dict:
    """A complete config with every default filled in."""
    from selfsup.methods_spec import method_arguments

    return {
        "method": method,
        "model": {k: p.default for k, p in method_arguments(method).items()},
        "data": dict(DATA_DEFAULTS),
        "trainer": dict(TRAINER_DEFAULTS),
        "seed": 0,
        "output": "runs",
        "name": None,
        "online_probe": True,
        "tensorboard": False,
        "checkpoint_every": None,
        "keep_checkpoints": KEEP_CHECKPOINTS,
        "verbose": False,
    }


def unknown_key_message(key: str, known, where: str) -> str:
    """``unknown <where> key 'lrr' (did you mean 'lr'?); known: ...``."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {where} key {key!r}{hint}; known: {', '.join(sorted(map(str, known)))}"


def merge_config(base: dict, override: dict, where: str = "config") -> dict:
    """``base`` updated by ``override`` (nested); an unknown key is an error, never silently ignored."""
    if not isinstance(override, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {override!r}")
    out = dict(base)
    for k, v in override.items():
        if k not in base:
            raise ConfigError(unknown_key_message(k, base, where))
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.{k}: expected a mapping of keys to values, got {v!r}")
            out[k] = merge_config(base[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def load_config(path: str | Path) -> dict:
    """Read a run's ``config.yaml`` (one written by a previous run, or by hand).

    Raises:
        ConfigError: the file is missing, unreadable, not text, not YAML, or not a mapping; the message
            names the file (and the line, for a YAML syntax error).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    if b"\x00" in raw:
        raise ConfigError(f"config file {path} is a binary file, not a YAML config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text, not a YAML config") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({problem} at{where or ' an unknown place'})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path}: expected a mapping (key: value lines) at the top level, "
                          f"got {type(cfg).__name__}")
    return cfg


# --------------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------------

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any, where: str = "max_time") -> str | None:
    """A wall-time limit as Lightning's ``DD:HH:MM:SS``: accepts that, ``90s``, ``3m``, ``1h30m``, ``2d``.

    ``None`` (or ``none``) means no limit. Raises :class:`ConfigError` for anything else, or zero.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where} must be a duration like 90s, 3m, 1h30m or DD:HH:MM:SS, got {value!r}")
    text = str(value).strip().lower()
    seconds: int | None = None
    if re.fullmatch(r"\d+(:\d+){0,3}", text):
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 4:
            seconds = sum(p * m for p, m in zip(parts, (86400, 3600, 60, 1), strict=True))
        elif len(parts) == 1:
            seconds = parts[0]
        else:
            raise ConfigError(f"{where} {value!r} is ambiguous: write DD:HH:MM:SS, or 90s, 3m, 1h30m")
    elif re.fullmatch(r"(\d+\s*[dhms]\s*)+", text):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+)\s*([dhms])", text))
    if seconds is None:
        raise ConfigError(f"{where} must be a duration like 90s, 3m, 1h30m or DD:HH:MM:SS, got {value!r}")
    if seconds <= 0:
        raise ConfigError(f"{where} must be longer than zero, got {value!r}")
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------


def _resolve(annotation: Any) -> Any:
    """An annotation (possibly a postponed string like ``'int | None'``) as a typing object; None if unknown."""
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        namespace = {**vars(typing), "int": int, "float": float, "str": str, "bool": bool, "list": list,
                     "tuple": tuple, "dict": dict}
        try:
            return eval(annotation, namespace)  # annotations are code of the project, not user input
        except Exception:  # a name this module cannot see: the value is checked by its consumer
            return None
    return annotation


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "list": "a list", "tuple": "a list", "dict": "a mapping"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    args = typing.get_args(tp)
    if args:  # a union
        return " or ".join(_describe(a) for a in args)
    return str(tp)


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (YAML's ``1e-3`` string to float, ``[0.5, 1]`` to a tuple); _Mismatch if not."""
    if tp is None or tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in sorted(typing.get_args(tp), key=lambda a: a is str):  # try str last: "3" stays an int
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(tp) and len(args) != len(value):
            raise _Mismatch
        items = [_coerce(v, args[min(i, len(args) - 1)]) if args else v for i, v in enumerate(value)]
        return type(value)(items) if isinstance(value, tuple) else items
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation this checker does not know: its consumer validates the value


def check_value(value: Any, annotation: Any, where: str, source: str = "") -> Any:
    """``value`` checked (and mildly coerced) against ``annotation``; one-line ConfigError naming ``where``."""
    tp = _resolve(annotation)
    try:
        out = _coerce(value, tp)
    except _Mismatch:
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}{where} must be {_describe(tp)}, got {value!r}") from None
    low = _MIN_VALUES.get(where)
    if low is not None and isinstance(out, int) and not isinstance(out, bool) and out < low:
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}{where} must be >= {low}, got {value!r}")
    return out


def data_arguments() -> dict[str, inspect.Parameter]:
    """The config's ``data`` keys: :class:`SelfSupDataModule`'s constructor arguments.

    Read from :data:`DATA_TYPES` (so checking a config imports no torch); a key it lacks is read from the
    class itself (``tests/test_cli_lazy.py`` checks the two agree).
    """
    if all(k in DATA_TYPES for k in DATA_DEFAULTS):
        return {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=DATA_DEFAULTS[k], annotation=DATA_TYPES[k])
                for k in DATA_DEFAULTS}
    from selfsup.data.datamodule import SelfSupDataModule

    params = inspect.signature(SelfSupDataModule.__init__).parameters
    return {k: params[k] for k in DATA_DEFAULTS if k in params}


def validate_config(cfg: dict, source: str = "") -> dict:
    """Check every key and value of a complete config (``default_config`` merged with a user's).

    Returns a copy with values coerced to their declared types (``max_time`` as ``DD:HH:MM:SS``).
    ``source`` (a file name) prefixes the messages.

    Raises:
        ConfigError: an unknown method or key, or a value of the wrong type or out of range.
    """
    from selfsup.methods_spec import method_arguments, method_names

    prefix = f"{source}: " if source else ""
    for k in cfg:
        if k not in (*TOP_LEVEL_TYPES, "model", "data", "trainer"):
            raise ConfigError(prefix + unknown_key_message(k, [*TOP_LEVEL_TYPES, "model", "data", "trainer"], "config"))
    out = dict(cfg)
    for k, ann in TOP_LEVEL_TYPES.items():
        if k in out:
            out[k] = check_value(out[k], ann, k, source)
    if out.get("name") is not None:
        check_run_name(out["name"], prefix + "name")
    method = out.get("method")
    if method not in method_names():
        raise ConfigError(prefix + unknown_name_message("method", method, method_names()))
    sections = {
        "model": method_arguments(method),
        "data": data_arguments(),
        "trainer": {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=a) for k, a in TRAINER_TYPES.items()},
    }
    for section, params in sections.items():
        values = out.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{prefix}{section} must be a mapping of keys to values, got {values!r}")
        checked = {}
        for k, v in values.items():
            if k not in params:
                where = f"{section} ({method})" if section == "model" else section
                raise ConfigError(prefix + unknown_key_message(k, params, where))
            checked[k] = check_value(v, params[k].annotation, f"{section}.{k}", source)
        out[section] = checked
    if "max_time" in out.get("trainer", {}):
        out["trainer"]["max_time"] = parse_duration(out["trainer"]["max_time"], "trainer.max_time")
    check_ranges(out, prefix)
    return out


MAX_SEED = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) largest seed

# (lowest, highest, whether the highest itself is allowed) of the model's float settings, where a method has them
_MODEL_RANGES = {
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, math.inf, False),
    "warmup_epochs": (0.0, math.inf, False),
}


def check_ranges(cfg: dict, prefix: str = "") -> None:
    """Values of the right type but out of range: one ConfigError line each, before any work."""
    seed = cfg.get("seed")
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{prefix}seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    model = cfg.get("model") or {}
    lr = model.get("lr")
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{prefix}model.lr must be a positive number, got {lr!r}")
    for key, (low, high, high_ok) in _MODEL_RANGES.items():
        value = model.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        inside = low <= value <= high if high_ok else low <= value < high
        if not inside or math.isnan(value):
            span = f"in [{low:g}, {high:g})" if math.isfinite(high) else f"a number >= {low:g}"
            raise ConfigError(f"{prefix}model.{key} must be {span}, got {value!r}")
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps"):
        if trainer.get(key) == 0:
            raise ConfigError(f"{prefix}trainer.{key} must be >= 1, or -1 for no limit, got 0")
    if (trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1 and not trainer.get("max_time")
            and not trainer.get("fast_dev_run")):
        raise ConfigError(f"{prefix}trainer.max_epochs and trainer.max_steps are both -1 (no limit) and no max_time "
                          "is set, so the run would never end: give --max-epochs, --max-steps or --max-time")


def unknown_name_message(what: str, name: Any, known) -> str:
    """``unknown method 'rotaton' (did you mean 'rotation'?); known: ...``."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; known: {', '.join(sorted(known))}"
