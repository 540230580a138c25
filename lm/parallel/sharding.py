"""Logical axis names -> mesh axes -> NamedSharding, in one place.

Model code names its dimensions ("embed", "mlp", "heads", ...) and calls
`constrain(x, names)` at block boundaries; only this module knows how names map to the
mesh. A dimension that does not divide by its mesh axes is replicated instead (e.g.
one KV head under tensor=4): always correct. A name with no rule is an error, not a
silent replication: a new kind of dimension gets a rule here (even an empty one).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.errors import ConfigError

# Mesh axes, outermost to innermost (lm/parallel/mesh.py builds the mesh in this order).
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Default rules. FSDP shards the parameters' embed dimension (and the batch); tensor
# parallelism splits heads and the MLP hidden dimension Megatron-style (column-parallel
# in-projections, row-parallel out-projections) and the vocabulary; sequence
# parallelism shards activations along the sequence.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # outside MoE layers, experts split the batch
    "seq": ("sequence",),
    "act_embed": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "layers": (),
    "conv": (),  # the taps of a causal convolution (Mamba-2)
    "experts": ("expert",),  # MoE experts (expert parallelism)
    "router": (),  # the router's expert scores: every token needs all of them
    "expert_mlp": ("tensor",),  # an expert's hidden dimension
    # Batched trials (lm/train/trials.py): K trials spread over the data axis (when K
    # divides by it), each trial's batch then over the remaining batch axes.
    "trials": ("data",),
}


def parse_rules(text: str) -> dict[str, tuple[str, ...]]:
    """'embed=fsdp+tensor,vocab=' -> rules overriding the defaults (empty = replicate)."""
    rules = dict(DEFAULT_RULES)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, axes = item.partition("=")
        if not sep or name not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules: bad rule {item!r} (known names: "
                              f"{', '.join(DEFAULT_RULES)})")
        mesh_axes = tuple(a for a in axes.split("+") if a)
        for a in mesh_axes:
            if a not in MESH_AXES:
                raise ConfigError(f"mesh.rules: unknown mesh axis {a!r} in {item!r}")
        rules[name] = mesh_axes
    return rules


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: dict[str, tuple[str, ...]]) -> P:
    """PartitionSpec for a value with these logical names; dims that don't divide, and
    mesh axes already used by an earlier dim, are left replicated."""
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (add one to "
                             "DEFAULT_RULES in lm/parallel/sharding.py)")
        axes = tuple(a for a in rules.get(name, ()) if name is not None
                     and a not in used and mesh.shape.get(a, 1) > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # drop inner axes until the dimension divides
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_shardings(axes_tree: dict, shapes_tree: Any, mesh: Mesh, rules) -> Any:
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    return jax.tree.map(lambda names, s: NamedSharding(mesh, spec_for(names, s.shape, mesh, rules)),
                        axes_tree, shapes_tree, is_leaf=is_axes)


# ---------------------------------------------------------------- activation constraints

_ACTIVE: list[tuple[Mesh, dict]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict):
    """Within this context (while tracing), `constrain` pins activations to the mesh."""
    _ACTIVE.append((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    spec = spec_for(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def is_sharded(name: str, dim: int) -> bool:
    """Whether `constrain` would shard a dimension of this size and logical name."""
    if not _ACTIVE:
        return False
    mesh, rules = _ACTIVE[-1]
    return spec_for((name,), (dim,), mesh, rules) != P(None)


def spec_for_names(names: tuple[str | None, ...], shape: tuple[int, ...]) -> P:
    """The PartitionSpec `constrain` would give (replicated without a mesh): the specs of
    a jax.shard_map written by hand inside the model."""
    if not _ACTIVE:
        return P()
    mesh, rules = _ACTIVE[-1]
    return spec_for(names, shape, mesh, rules)


def active_mesh() -> Mesh | None:
    """The mesh `constrain` pins activations to while tracing, or None."""
    return _ACTIVE[-1][0] if _ACTIVE else None


def shard_axes(name: str, dim: int) -> tuple[str, ...]:
    """The mesh axes `constrain` would split a dimension of this name and size over
    (empty: replicated, or no mesh)."""
    if not _ACTIVE:
        return ()
    mesh, rules = _ACTIVE[-1]
    entry = spec_for((name,), (dim,), mesh, rules)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_names(n) -> bool:
    """A tuple of logical names (or None), as opposed to a tuple of such tuples."""
    return n is None or (isinstance(n, tuple) and all(isinstance(e, str) or e is None
                                                      for e in n))


def shard_local(fn, in_names: tuple, out_names: Any):
    """`fn` applied per shard (jax.shard_map) over the active mesh, for code the compiler
    cannot partition itself (Pallas kernels are custom calls: left to GSPMD they run
    replicated, after an all-gather). `in_names`: one tuple of logical names per
    positional argument (None for an argument passed whole, e.g. a scalar); `out_names`:
    the same for the outputs, as a pytree of tuples matching fn's result. Each argument
    is laid out by the rules, as `constrain` would; fn must be correct on any such shard
    (e.g. attention over local batch rows and heads). Outside a mesh context, or on a
    1-device mesh, fn is called directly."""
    def wrapped(*args):
        if not _ACTIVE or _ACTIVE[-1][0].size == 1:
            return fn(*args)
        mesh, rules = _ACTIVE[-1]
        out_shapes = jax.eval_shape(fn, *args)  # global shapes: fn is shape-polymorphic
        in_specs = tuple(P() if n is None else spec_for(n, a.shape, mesh, rules)
                         for n, a in zip(in_names, args))
        out_specs = jax.tree.map(lambda n, x: P() if n is None else spec_for(n, x.shape, mesh, rules),
                                 out_names, out_shapes,
                                 is_leaf=_is_names)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)
    return wrapped


def batch_sharding(mesh: Mesh, rules: dict, seq_len: int, batch: int) -> NamedSharding:
    return NamedSharding(mesh, spec_for(("batch", "seq"), (batch, seq_len), mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of (sharded) arrays or ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total
