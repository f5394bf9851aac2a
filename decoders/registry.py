"""Alignment methods by name: the one list the protocol, the ingress, the cost budget, the
objectives endpoint and the load tools read.

Adding a method = one file under ``decoders/`` with a ``Method`` subclass, plus one line in
``BUILTIN`` below. Methods from elsewhere (a user's package) are plug-ins: name them in the
``ALIGNSERVE_METHODS`` environment variable (comma-separated ``module:Class``) or register them as
entry points in the ``alignserve.methods`` group; they load when the registry is first read, in
every process, before the request schema is built.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from decoders.base import Method

# name order is the order of the `alignment.method` enum in the API schema
BUILTIN = (
    "decoders.plain:Plain",
    "decoders.best_of_n:BestOfN",
    "decoders.vas:VAS",
    "decoders.transfer_q:TransferQ",
    "decoders.transfer_q:ARGS",
)
PLUGINS_ENV = "ALIGNSERVE_METHODS"
ENTRY_POINT_GROUP = "alignserve.methods"

_METHODS: dict[str, type[Method]] = {}


def _load(path: str) -> type[Method]:
    module, _, qualname = path.partition(":")
    if not module or not qualname:
        raise ValueError(f"method {path!r}: expected 'module:Class'")
    obj = importlib.import_module(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"method {path!r} is not a decoders.base.Method subclass")
    return obj


def register(cls: type[Method]) -> type[Method]:
    """Add a method (usable as a class decorator). Its ``name`` must be new."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a decoders.base.Method subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method class {cls.__name__} needs a `name` that is an identifier, got {name!r}")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].__module__})")
    _METHODS[name] = cls
    return cls


def _ensure_loaded() -> None:
    if _METHODS:
        return
    paths = list(BUILTIN)
    paths += [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        paths.append(ep.value)
    for path in dict.fromkeys(paths):
        register(_load(path))


def methods() -> dict[str, type[Method]]:
    """Every registered method, by name (built-ins first)."""
    _ensure_loaded()
    return dict(_METHODS)


def get(name: str) -> type[Method]:
    _ensure_loaded()
    return _METHODS[name]


def knobs(name: str) -> list[str]:
    """The ``alignment`` fields method ``name`` takes (besides ``method``), in declaration order."""
    return [f for f in get(name).Params.model_fields if f != "method"]


def needs_weights(name: str) -> bool:
    """Whether method ``name`` refuses a request without a reward mixture."""
    return bool(getattr(get(name).Params, "needs_weights", False))
