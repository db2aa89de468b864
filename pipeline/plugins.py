"""One registry idiom for every extension point, and the discovery of installed plugins.

Each registry maps names to entries: head families, backbone families, data-set layouts, task kinds, loss
weightings, evaluation protocols. It is declared here, in the base layer, with the module that registers each
built-in entry, so the config and the CLI know every name (and build their choices and help from `names()`)
without importing torch or the module that defines the entry; the module is imported the first time its entry is
needed. An entry registers itself with the registry's decorator; a name registered twice is an error.

An installed package adds entries through an entry point in the registry's group (`resmtnet.<kind>`, e.g. in its
setup.cfg: `[options.entry_points] resmtnet.weightings = my-weighting = my_package.weighting`): the entry point's
name is the entry's name, its value a module whose import registers it (or `module:object`, registered under the
name). The README's extension table says which file each kind of entry takes.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from importlib import metadata
from typing import Any, Dict, Generic, Iterator, List, Mapping, Optional, Tuple, TypeVar

from pipeline.errors import ConfigError


T = TypeVar("T")
GROUP_PREFIX = "resmtnet."


class Registry(Mapping[str, T], Generic[T]):
    """Names -> entries of one kind. `builtin` maps each built-in name to the module that registers it (in
    detection / listing order); installed plugins add names through the entry-point group `resmtnet.<key>`.

    Iterating it (`items()`, `values()`, `len`) loads every entry; `in` and `names()` import nothing, `[name]` and
    `find(name)` import only the module that registers `name`."""

    def __init__(self, key: str, kind: str, builtin: Dict[str, str]) -> None:
        self.key, self.kind, self.builtin = key, kind, dict(builtin)
        self.group = GROUP_PREFIX + key
        self._entries: Dict[str, T] = {}
        self._origin: Dict[str, str] = {}
        self._plugins: Optional[Dict[str, metadata.EntryPoint]] = None
        self._loaded = False

    # ---- registering
    def register(self, name: str, entry: Any = None) -> Any:
        """Register `entry` under `name`; without `entry`, a decorator that registers what it decorates."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        if not name:
            raise ValueError(f"a {self.kind} needs a name")
        origin = _registering_module() or getattr(entry, "__module__", "?")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} '{name}' is registered twice (by {self._origin[name]} and {origin})")
        self._entries[name] = entry
        self._origin[name] = origin
        return entry

    # ---- discovery
    def plugins(self) -> Dict[str, metadata.EntryPoint]:
        """The installed packages' entry points of this registry's group, by name."""
        if self._plugins is None:
            self._plugins = {ep.name: ep for ep in installed().select(group=self.group)}
        return self._plugins

    def origin(self, name: str) -> str:
        """The module that registered `name` (its entry loaded first)."""
        self.find(name)
        return self._origin[name]

    def names(self) -> Tuple[str, ...]:
        """Every name, without importing any entry: the built-ins in order, then registered ones, then plugins'."""
        return tuple(dict.fromkeys((*self.builtin, *self._entries, *self.plugins())))

    def _import(self, name: str) -> None:
        if name in self.builtin:
            where = self.builtin[name]
            importlib.import_module(where)
        elif name in self.plugins():
            ep = self.plugins()[name]
            where = ep.value
            loaded = ep.load()
            if name not in self._entries and not isinstance(loaded, type(importlib)):
                self.register(name, loaded)
        else:
            return
        if name not in self._entries:
            raise ValueError(f"{self.kind} '{name}': importing {where} did not register it")

    def find(self, name: str, where: str = "") -> T:
        """The entry called `name`, its module imported if needed; an unknown name is one line listing the valid
        ones (with the closest), prefixed by `where` (e.g. the config key)."""
        if name not in self._entries:
            self._import(name)
        if name not in self._entries:
            valid = self.names()
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} '{name}'; valid: {', '.join(valid)}{hint}")
        return self._entries[name]

    def load(self) -> "Registry[T]":
        """Import every built-in and installed entry (once)."""
        if not self._loaded:
            for name in self.names():
                if name not in self._entries:
                    self._import(name)
            self._loaded = True
        return self

    # ---- the mapping (loads everything)
    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            self._import(name)
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.load()
        order = {name: i for i, name in enumerate(self.names())}  # names() lists every registered name
        return iter(sorted(self._entries, key=order.__getitem__))

    def __len__(self) -> int:
        return len(self.load()._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.builtin or name in self._entries or name in self.plugins())

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a temporary one)."""
        self._entries.pop(name, None)
        self._origin.pop(name, None)


def _registering_module(depth: int = 8) -> Optional[str]:
    """The module whose top-level code is registering (the nearest module frame: through a decorator or a helper
    such as register_layout), None when registration happens inside a function (a test)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "<module>":
            return frame.f_globals.get("__name__")
        frame = frame.f_back
    return None


REGISTRIES: Dict[str, Registry] = {}
_INSTALLED: List[metadata.EntryPoints] = []


def installed() -> metadata.EntryPoints:
    """Every installed package's entry points, read once per process (one scan of the environment serves every
    registry: about 0.1 s with a hundred packages)."""
    if not _INSTALLED:
        _INSTALLED.append(metadata.entry_points())
    return _INSTALLED[0]


def declare(key: str, kind: str, builtin: Dict[str, str]) -> Registry:
    registry: Registry = Registry(key, kind, builtin)
    REGISTRIES[key] = registry
    return registry


_RESMTNET, _LOC, _PATCH = "pipeline.heads.resmtnet.family", "pipeline.heads.loc.family", "pipeline.heads.patch.family"
#: Stage two's head families (pipeline.heads.plugin.HeadPlugin); the reference family first.
HEAD_FAMILIES: Registry = declare("head_families", "head family", {"res-mtnet": _RESMTNET, "loc": _LOC,
                                                                   "patch": _PATCH})
#: Each head family's settings dataclass, its config section heads.<name>: registered by a module that imports
#: no torch, so a config is built and checked before any family loads (a family not listed here: its `settings`).
HEAD_SETTINGS: Registry = declare("head_settings", "head family settings", {
    name: f"{module.rsplit('.', 1)[0]}.settings" for name, module in HEAD_FAMILIES.builtin.items()})
#: Backbone libraries (pipeline.features.backbones.Family), the part of a spec before the colon.
BACKBONE_FAMILIES: Registry = declare("backbone_families", "backbone family", {
    name: f"pipeline.features.families.{name}_family" for name in ("timm", "torchvision", "hf", "txv")})
#: Data-set layouts (pipeline.data.table.Layout), in detection order: the first whose marker file is found wins.
LAYOUTS: Registry = declare("layouts", "data layout", {
    "kaggle": "pipeline.data.layouts.jsrt", "jsrt": "pipeline.data.layouts.jsrt",
    **{name: f"pipeline.data.layouts.{name}"
       for name in ("nih", "chexpert", "mimic", "vindr", "vinbigdata", "rsna", "siim", "padchest")},
    # last: a manifest.csv next to a data set's own files is not what names it
    "manifest": "pipeline.data.layouts.manifest"})
#: Task kinds (pipeline.core.kinds.Kind): how a task's labels are encoded, lost and scored.
TASK_KINDS: Registry = declare("task_kinds", "task kind", {
    name: "pipeline.core.kinds" for name in ("multiclass", "binary", "regression", "multilabel")})
#: Loss weightings of the stacked trainer (pipeline.core.weighting.Weighting).
WEIGHTINGS: Registry = declare("weightings", "loss weighting", {
    name: "pipeline.core.weighting" for name in ("fixed", "uncertainty", "dwa", "gradnorm")})
#: Evaluation protocols (pipeline.core.splits.Protocol).
PROTOCOLS: Registry = declare("protocols", "evaluation protocol", {
    name: "pipeline.core.splits"
    for name in ("kfold", "holdout", "official", "insample", "contaminated", "external", "leave-one-dataset-out")})


def catalogue() -> Dict[str, List[Tuple[str, str]]]:
    """Every registry's entries, each imported, as (name, the module that registered it), for `resmtnet plugins`:
    a broken plugin fails here with its own error."""
    return {registry.kind: [(name, registry.origin(name)) for name in registry.load()]
            for registry in REGISTRIES.values()}
