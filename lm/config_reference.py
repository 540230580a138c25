"""The knob reference, generated from the field declarations (lm/schema.py `knob`):
`lm config --show [SECTION]` prints it, `lm config --show --markdown` writes
docs/config-reference.md (tests/test_config_reference.py keeps the two in step)."""

from __future__ import annotations

import json
import textwrap
import typing
from typing import Any, Literal

from lm import schema
from lm.config import ConfigError, TrainConfig

HEADER = """# Config reference

Every knob of a run, by section: `lm train --set KEY=VALUE`, a config file's
`TrainConfig(...)`, and a run's `config.json` use these keys. Generated from the field
declarations (`lm config --show --markdown > docs/config-reference.md`); do not edit by
hand. `lm config --show SECTION` prints one section, plug-ins' sections included.

Roles (what a knob may do beyond configuring a run):

{roles}
"""


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def default_text(value: Any) -> str:
    """As config.json and --set write it (true, "auto", 0.001)."""
    return json.dumps(value)


def _selected(section: str | None, builtin_only: bool):
    out = []
    for key, cls, doc in schema.sections(TrainConfig):
        if builtin_only and _is_plugin(key):
            continue
        if section is None or key == section or key.startswith(section + "."):
            out.append((key, cls, doc))
    if not out:
        names = ", ".join(k for k, _, _ in schema.sections(TrainConfig) if k)
        raise ConfigError(f"lm config --show: unknown section {section!r} (sections: {names})")
    return out


def _is_plugin(key: str) -> bool:
    node: Any = TrainConfig
    for part in key.split(".") if key else []:
        entry = {e.name: e for e in schema.entries(node)}[part]
        if entry.plugin:
            return True
        node = entry.hint
    return False


def _leaves(cls: type) -> list[schema.Entry]:
    return [e for e in schema.entries(cls) if not e.is_section]


def text(section: str | None = None) -> str:
    """The reference as plain text, one block per knob."""
    lines = []
    for key, cls, doc in _selected(section, builtin_only=False):
        leaves = _leaves(cls)
        if not leaves:
            continue
        lines.append(f"[{key or 'run'}] {doc}".rstrip())
        for e in leaves:
            roles = f"  ({', '.join(sorted(e.roles))})" if e.roles else ""
            full = f"{key}.{e.name}" if key else e.name
            lines.append(f"  {full}: {type_name(e.hint).replace(chr(92), '')} = "
                         f"{default_text(e.default)}{roles}")
            if e.doc:
                lines += textwrap.wrap(e.doc, 88, initial_indent="      ",
                                       subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def markdown() -> str:
    """docs/config-reference.md: the built-in sections (no plug-ins), one table each."""
    roles = "\n".join(f"- `{name}`: {doc}" for name, doc in schema.ROLES.items())
    out = [HEADER.format(roles=roles)]
    for key, cls, doc in _selected(None, builtin_only=True):
        leaves = _leaves(cls)
        if not leaves:
            continue
        out.append(f"## `{key or '(run)'}`\n\n{doc}\n")
        out.append("| key | type | default | roles | description |")
        out.append("|---|---|---|---|---|")
        for e in leaves:
            full = f"{key}.{e.name}" if key else e.name
            out.append(f"| `{full}` | {type_name(e.hint)} | `{default_text(e.default)}` | "
                       f"{', '.join(sorted(e.roles))} | {e.doc.replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
