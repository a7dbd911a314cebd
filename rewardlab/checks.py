"""Settings are checked before anything is built: every value a config passes to a `_target_` must
fit that target's type hints, so `data.max_length=abc` is one line naming the key, not a TypeError
from deep inside a library after minutes of set-up."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from rewardlab.data.rows import describe_value
from rewardlab.errors import UserError


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the key and what was expected."""


def _hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The annotated parameters of a function or class constructor; {} where they cannot be read."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
        parameters = inspect.signature(function).parameters
    except (NameError, TypeError, ValueError):
        return {}
    return {k: v for k, v in hints.items() if k in parameters}


def _problem(value: Any, hint: Any, where: str) -> str | None:
    """None if `value` fits `hint`, else `where: expected ..., got ...` (naming the element of a list
    or dict that does not fit)."""
    origin, args = get_origin(hint), get_args(hint)
    wrong = f"{where}: expected {_hint_name(hint)}, got {describe_value(value)}"
    if (isinstance(value, dict) and "_target_" in value) or hint is Any or isinstance(hint, typing.TypeVar):
        return None  # built by instantiate into whatever it names; or anything goes
    if origin in (Union, types.UnionType):
        problems = [_problem(value, h, where) for h in args]
        fits_container = [p for h, p in zip(args, problems) if p and p.split(":")[0] != where]
        return None if None in problems else (fits_container[0] if fits_container else wrong)
    if origin is Literal:
        return None if value in args else wrong
    simple = {type(None): value is None, bool: isinstance(value, bool), str: isinstance(value, str)}
    simple[int] = isinstance(value, int) and not isinstance(value, bool)
    simple[float] = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in simple:
        return None if simple[hint] else wrong
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return wrong
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return wrong
            pairs = list(zip(value, args))
        else:
            pairs = [(v, args[0]) for v in value] if args else []
        return next((p for i, (v, h) in enumerate(pairs) if (p := _problem(v, h, f"{where}[{i}]"))), None)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return wrong
        return next((p for k, v in value.items() if args and (p := _problem(v, args[1], f"{where}.{k}"))), None)
    if inspect.isclass(hint) and hint.__module__ != "builtins":
        return None if isinstance(value, hint) else wrong
    return None  # callables, protocols and other hints the target checks itself


def _accepted(target: Callable[..., Any]) -> set[str] | None:
    """The keyword names a target takes; None when it takes any (`**kwargs`) or cannot be read."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_types(node: Any, key: str, allow_auto: tuple[str, ...] = ()) -> None:
    """Walk a config; for every `_target_`, each value it passes must fit the target's type hints
    (keys in `allow_auto` may also be `auto`, decided by rewardlab before the target is built)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, list):
        for i, value in enumerate(node):
            check_types(value, f"{key}[{i}]")
        return
    if not isinstance(node, dict):
        return
    target = get_object(node["_target_"]) if isinstance(node.get("_target_"), str) else None
    hints = _hints(target) if target is not None else {}
    accepted = _accepted(target) if target is not None else None
    if accepted is not None and (unknown := [k for k in node if not k.startswith("_") and k not in accepted]):
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(
            f"{where}: not a setting of {node['_target_']} (it takes {', '.join(sorted(accepted)) or 'none'}); "
            "another option of the group may have it"
        )
    for name, value in node.items():
        where = f"{key}.{name}" if key else name
        if name in hints and not (where in allow_auto and value == "auto"):
            if problem := _problem(value, hints[name], where):
                raise ConfigError(problem)
        check_types(value, where, allow_auto)


def _hint_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_max_length(max_length: int, model_config: Any) -> None:
    """`data.max_length` within the backbone's position limit (beyond it, an IndexError at step 1)."""
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length}: the backbone reads at most {limit} positions "
            f"(max_position_embeddings); set data.max_length <= {limit}"
        )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Settings whose type alone does not say they can work: each key, the test, and what it expects.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32, "an integer in [0, 2^32)"),
    "test": (lambda v: isinstance(v, bool), "true or false"),
    "resume.allow_changes": (lambda v: isinstance(v, bool), "true or false"),
    "optimizer.lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "optimizer.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.betas": (
        lambda v: isinstance(v, list) and all(_number(b) and 0 <= b < 1 for b in v),
        "numbers in [0, 1)",
    ),
    "model.head_lr_mult": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_number(v) and v > 0), "null or a finite number > 0"),
    "trainer.accumulate_grad_batches": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.val_check_interval": (
        lambda v: (isinstance(v, float) and 0 < v <= 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "a fraction of an epoch in (0, 1] or a number of batches >= 1",
    ),
    "trainer.max_epochs": (lambda v: isinstance(v, int) and v >= -1, "an integer >= -1 (-1: no limit)"),
    "trainer.max_steps": (lambda v: isinstance(v, int) and v >= -1, "an integer >= -1 (-1: no limit)"),
    "uncertainty_quantiles": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
        "an integer in [1, 1000]",
    ),
    "length_gap_edges": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
            and v == sorted(set(v))
        ),
        "a list of increasing integers (response tokens)",
    ),
    "length_calibration": (lambda v: v in (None, "val", "test"), "null, val or test"),
    "head.k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 1024, "an integer in [2, 1024]"),
    "head.length_coef": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "head.ortho_coef": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "head.normalize": (lambda v: isinstance(v, bool), "true or false"),
    "loss.log_tie_init": (lambda v: _number(v) and abs(v) <= 20, "a number in [-20, 20] (ν = e^log_tie)"),
    "loss.lr": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (the loss's own parameters' learning rate)"),
    "loss.kind": (lambda v: v in ("mse", "gaussian_nll"), "mse or gaussian_nll"),
}


def check_ranges(cfg: DictConfig) -> None:
    """The settings in `RANGES` hold values that can work (a negative learning rate, a clipping norm
    that flips gradients, `resume.allow_changes=no` read as a truthy string: refused by key)."""
    absent = object()
    for key, (test, expected) in RANGES.items():
        node = OmegaConf.select(cfg, key, default=absent)
        if node is absent:
            continue
        value = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node
        if not test(value):
            raise ConfigError(f"{key}: expected {expected}, got {describe_value(value)}")
