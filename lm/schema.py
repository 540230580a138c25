"""What a config field is and may do, declared where the field is declared.

A knob is a dataclass field made with `knob(default, doc=..., roles=...)`: its doc is the
one description of it (`lm config --show`, docs/config-reference.md) and its roles say
what it may do beyond configuring a run (ROLES). Every list of fields with a role
(operational fields, fields free under --init-from, eval-time knobs, traced fields of
batched trials) is computed from the schema by `keys_with_role`, never kept by hand.

A section (ModelConfig, OptimConfig) that plug-ins extend is a `Composed` dataclass: its
built-in sections are declared fields (typed, seen by editors); a plug-in (a mixer, an
optimizer) registers its section with `register_section(group, name, Config)` whenever
it is imported, before or after lm.config, and every config of that group has it from
then on: `cfg.model.<name>`, --set, config.json and validation see it like a declared one.

This module imports nothing of lmlab: every owner of a section can import it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Iterator

ROLES = {
    "operational": "may change between a run and its resumption: it steers bookkeeping, "
                   "not the computation (checked by lm train on an existing run dir)",
    "after_resume": "may change between a run and its resumption: it steers only what the "
                    "steps after the resume compute (data.stages: a later stage edited), so "
                    "the resumed run is the uninterrupted one up to the resume",
    "free_init": "may differ from the source's under --init-from: it changes how the "
                 "weights are computed with, not their shapes",
    "eval_time": "settable by `lm eval --set` on a trained run: the parameters fit unchanged",
    "traced": "may differ between the trials of a batched group: enters the step as a "
              "traced scalar (the code behind it must not branch on its value in Python)",
    "per_trial": "may differ between the trials of a batched group: read on the host "
                 "(not traced)",
}


def knob(default: Any = MISSING, *, doc: str = "", roles: typing.Iterable[str] = (),
         default_factory: Any = MISSING) -> Any:
    """A config field with its description and roles (see ROLES)."""
    roles = frozenset(roles)
    if unknown := roles - set(ROLES):
        raise TypeError(f"unknown knob role(s) {sorted(unknown)}; roles: {', '.join(ROLES)}")
    meta = {"doc": " ".join(doc.split()), "roles": roles}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, *, doc: str = "") -> Any:
    """A field holding a sub-section (a frozen dataclass) at its defaults."""
    return knob(default_factory=cls, doc=doc or first_line(cls.__doc__))


def first_line(text: str | None) -> str:
    """The first sentence-ish line of a docstring (its first paragraph, joined)."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


# ----------------------------------------------------------------------------- plug-ins

_SECTIONS: dict[str, dict[str, type]] = {}  # group -> {name: section class}


def register_section(group: str, name: str, cls: type) -> None:
    """Give every config of `group` ("model", "optim") a section `name` of type `cls`."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"section {group}.{name}: {cls.__name__} must be a frozen dataclass")
    table = _SECTIONS.setdefault(group, {})
    if table.get(name, cls) is not cls:
        raise ValueError(f"section {group}.{name} is registered twice")
    table[name] = cls


def registered_sections(group: str) -> dict[str, type]:
    return dict(_SECTIONS.get(group, {}))


@dataclass(frozen=True)
class Composed:
    """A section whose sub-sections are partly plug-ins (see the module doc). The plug-in
    sections set away from their defaults are kept in `plugins` (name, value) pairs;
    `cfg.<name>` reads one (its defaults when unset) and `replace` sets one."""
    section_group: ClassVar[str] = ""
    plugins: tuple = field(default=(), kw_only=True, repr=False,
                           metadata={"hidden": True, "doc": "", "roles": frozenset()})

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        if name.startswith("__") or name == "plugins":
            raise AttributeError(name)
        extra = plugin_sections(type(self))
        if name in extra:
            return dict(self.plugins).get(name) or extra[name]()
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def plugin_sections(cls: type) -> dict[str, type]:
    """The registered sections of a Composed class that it does not declare."""
    if not (isinstance(cls, type) and issubclass(cls, Composed)):
        return {}
    declared = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    out = {}
    for name, sec in registered_sections(cls.section_group).items():
        if name in declared:
            if hints[name] is not sec:
                raise TypeError(f"{cls.section_group}.{name}: the registered section "
                                f"{sec.__name__} clashes with the declared field "
                                f"{cls.__name__}.{name}")
            continue
        out[name] = sec
    return out


def replace(node: Any, **changes: Any) -> Any:
    """dataclasses.replace that also sets plug-in sections of a Composed node."""
    extra = plugin_sections(type(node))
    mine = {k: v for k, v in changes.items() if k not in extra}
    if len(mine) < len(changes):
        plugins = dict(node.plugins)
        for k, v in changes.items():
            if k in extra:
                plugins[k] = v
        mine["plugins"] = tuple(sorted((k, v) for k, v in plugins.items()
                                       if v != extra[k]()))
    return dataclasses.replace(node, **mine)


def moved_keys(cls: type) -> dict[str, list[tuple[str, str]]]:
    """Flat keys of earlier releases -> [(section, field)] where they live now, from the
    `legacy` maps of the group's registered sections."""
    out: dict[str, list[tuple[str, str]]] = {}
    if isinstance(cls, type) and issubclass(cls, Composed):
        for name, sec in registered_sections(cls.section_group).items():
            for old, new in getattr(sec, "legacy", {}).items():
                out.setdefault(old, []).append((name, new))
    return out


# ----------------------------------------------------------------------------- walking


@dataclass(frozen=True)
class Entry:
    """One field of a section, as the schema sees it."""
    name: str
    hint: Any  # the resolved type; a dataclass for a sub-section
    default: Any  # for a sub-section: its default instance
    doc: str
    roles: frozenset
    plugin: bool = False  # a registered plug-in section

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.hint)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def entries(cls: type) -> list[Entry]:
    """The fields of a section class, declared ones in order, then plug-in sections."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("hidden"):
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        hint = hints[f.name]
        doc = f.metadata.get("doc", "")
        if not doc and dataclasses.is_dataclass(hint):
            doc = first_line(hint.__doc__)
        out.append(Entry(f.name, hint, default, doc, f.metadata.get("roles", frozenset())))
    for name, sec in plugin_sections(cls).items():
        out.append(Entry(name, sec, sec(), first_line(sec.__doc__), frozenset(), plugin=True))
    return out


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Entry]]:
    """(dotted key, entry) of every leaf field under `cls`, sections depth first."""
    for e in entries(cls):
        if e.is_section:
            yield from walk(e.hint, f"{prefix}{e.name}.")
        else:
            yield f"{prefix}{e.name}", e


def sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type, str]]:
    """(dotted key, class, doc) of `cls` and every sub-section under it."""
    yield prefix.rstrip("."), cls, first_line(cls.__doc__)
    for e in entries(cls):
        if e.is_section:
            yield from sections(e.hint, f"{prefix}{e.name}.")


def keys_with_role(cls: type, role: str, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the fields under `cls` that declare `role` (plug-ins included, as
    registered at the time of the call)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return tuple(key for key, e in walk(cls, prefix) if role in e.roles)
