"""The registry of methods: name -> `Method`, filled with the built-in methods and the plug-ins.

Plug-ins are found, once, on the first look-up: every entry point of the group
`tagclip_cli.methods` (an installed package's `[project.entry-points."tagclip_cli.methods"]`) and
every module named in the environment variable `TAGCLIP_METHODS` (comma-separated, e.g.
`TAGCLIP_METHODS=my_package.my_method tagclip segment ...`). Loading one imports it; a module
registers its methods with `register`; an entry point, or a `module:attribute` in the variable,
may also name a `Method` object itself, which is then registered.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points
from typing import Any

from tagclip_cli.errors import UsageError, with_suggestion
from tagclip_cli.methods.base import KINDS, SEGMENT_OPTIONS, Method

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tagclip_cli.methods"
PLUGIN_ENV = "TAGCLIP_METHODS"
BUILTIN_MODULES = (
    "tagclip_cli.methods.tagclip",
    "tagclip_cli.methods.clses",
    "tagclip_cli.methods.maskclip",
    "tagclip_cli.methods.sclip",
    "tagclip_cli.methods.clearclip",
    "tagclip_cli.methods.naclip",
    "tagclip_cli.methods.resclip",
    "tagclip_cli.methods.scclip",
    "tagclip_cli.methods.piaa",
)

_methods: dict[str, Method] = {}
_loaded = False


def register(method: Method, replace: bool = False) -> Method:
    """Add a method (see `base.Method`); its name must be new unless replace. Returns it, so that
    `register(MyMethod())` can stand at a module's top level."""
    if not isinstance(method, Method):
        raise TypeError(f"{method!r} lacks the Method protocol's attributes (tagclip_cli.methods.base.Method)")
    if method.kind not in KINDS:
        raise ValueError(f"method '{method.name}': kind must be one of {', '.join(KINDS)}, not '{method.kind}'")
    unknown = set(method.options) - set(SEGMENT_OPTIONS)
    if unknown:
        raise ValueError(f"method '{method.name}': unknown options {sorted(unknown)} (known: {SEGMENT_OPTIONS})")
    if method.name in _methods and not replace and _methods[method.name] is not method:
        raise ValueError(f"a method named '{method.name}' is already registered")
    _methods[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests, or a plug-in replacing a built-in under another name)."""
    _methods.pop(name, None)


def _import_target(target: str) -> Any:
    """`module` or `module:attribute` (the entry-point syntax)."""
    module, _, attribute = target.partition(":")
    obj = importlib.import_module(module)
    for name in filter(None, attribute.split(".")):
        obj = getattr(obj, name)
    return obj


def _load_plugin(target: str | Any, source: str) -> None:
    try:
        obj = _import_target(target) if isinstance(target, str) else target.load()
    except Exception as exc:  # a broken plug-in must not break the built-in methods
        log.warning("cannot load method plug-in %s (%s): %s", target if isinstance(target, str) else target.value,
                    source, exc)
        return
    if isinstance(obj, Method):
        register(obj, replace=True)


def load_methods() -> None:
    """Import the built-in methods and the plug-ins (once; later calls do nothing)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        _load_plugin(entry, f"entry point {entry.name}")
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
        _load_plugin(module, PLUGIN_ENV)


def names(kind: str | None = None) -> tuple[str, ...]:
    """The registered methods' names (of one kind: "tags" or "masks"), built-ins first."""
    load_methods()
    builtin = [module.rsplit(".", 1)[1] for module in BUILTIN_MODULES]  # a built-in's module is its name
    order = sorted(_methods, key=lambda name: builtin.index(name) if name in builtin else len(builtin))
    return tuple(name for name in order if kind is None or _methods[name].kind == kind)


def get(name: str, kind: str | None = None) -> Method:
    """The method called name (of that kind); UsageError listing the choices otherwise."""
    load_methods()
    method = _methods.get(name)
    if method is None or (kind is not None and method.kind != kind):
        what = {"masks": "segmentation method", "tags": "tagging method"}.get(kind or "", "method")
        raise UsageError(with_suggestion(f"unknown {what} '{name}' (choose from {', '.join(names(kind))})", name,
                                         names(kind)))
    return method


def configure(name: str, setting: str = "voc", **options: Any) -> Any:
    """The config of mask method `name` for a dataset setting from the segment command's flat
    options (`base.SEGMENT_OPTIONS`; None / False = not set): what `segment` and the API share.
    An option the method does not take raises UsageError."""
    method = get(name, "masks")
    unknown = sorted(set(options) - set(SEGMENT_OPTIONS))
    if unknown:
        raise UsageError(f"unknown segment options {unknown} (known: {', '.join(SEGMENT_OPTIONS)})")
    given = {key: value for key, value in options.items() if value not in (None, False)}
    refused = sorted(set(given) - set(method.options))
    if refused:
        raise UsageError(f"--method {name} does not take {', '.join('--' + k.replace('_', '-') for k in refused)}")
    if setting not in method.settings:
        raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(method.settings)})")
    return method.config(setting, **given)
