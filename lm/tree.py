"""Parameter trees as pure dicts (`nnx.to_pure_dict`), addressed by key paths such as
("blocks", 0, "mixer", "wq"): the one home of the path helpers that LoRA, recursion and
the Hugging Face tensor table share."""

from __future__ import annotations

from typing import Callable, Iterator


def get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value) -> None:
    """Sets tree[path] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def leaf_paths(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(path, leaf) of every leaf, depth first in key order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def path_key(path: tuple) -> str:
    """A path as one dict key ("blocks-0-mixer-wq"): adapters are stored flat by it."""
    return "-".join(map(str, path))


def with_pure_params(module, update: Callable[[dict], dict]):
    """A copy of nnx `module` whose parameters are update(its params as a pure dict):
    how LoRA and recursive relaxations fold their updates into a module's weights, so
    the module's own code (every mixer and kernel) runs on the effective weights."""
    from flax import nnx
    graphdef, state = nnx.split(module)
    pure = update(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
