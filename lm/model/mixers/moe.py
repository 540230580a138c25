"""Mixture-of-experts channel mixer (code "e", section model.moe).

Each token is routed to `top_k` of `n_experts` feed-forward experts (width `ratio *
d_model`, independent of the dense MLP's: fine-grained experts) and gets the gate-
weighted sum of their outputs, plus `n_shared_experts` always-on experts (one dense MLP
of n_shared x the expert width). Routing: softmax or sigmoid scores over the experts,
top-k, optionally renormalised over the chosen k; the auxiliary-loss-free balancing bias
(DeepSeek-V3) shifts only which experts are chosen, never the gate weights.

Computation is dropless by default: assignments (token, expert) are sorted by expert and
each expert's rows are one group of a grouped matmul (kernels/grouped_matmul.py:
megablox on TPU, blocks of rows per expert on CPU, `lax.ragged_dot` on GPU).
`capacity_factor` > 0 keeps at most C = ceil(capacity_factor * tokens * top_k /
n_experts) assignments per expert and group of tokens (in token order; GShard's rule);
a dropped assignment contributes nothing, so a token whose every assignment is dropped
passes through the residual unchanged.

Parallelism. Routing (scores, top-k, gates) and its statistics (expert load, the
auxiliary loss, the router z-loss) are plain jnp over the global batch, which the
compiler partitions: they, the losses and their gradients equal the single-device
values. The dispatch runs per shard (jax.shard_map): a shard sends its own tokens'
assignments (batch and sequence shards are the token groups above). Expert weights are
split over the `expert` mesh axis (logical name "experts") and their hidden dimension
over `tensor` ("expert_mlp"); FSDP-sharded weights are gathered on entry as any weight
is. With an expert axis, a shard sends each assignment to the shard holding its expert in
an all-to-all, that shard runs its experts over what it received, and a second
all-to-all brings the outputs back. The send buffers have a fixed size (XLA:CPU has no
ragged_all_to_all): dropless, room for all of a shard's assignments to each destination
(exact, but the all-to-all moves `expert` times the bytes of an average routing);
capacity mode, room for n_experts / expert x C assignments.

The layer returns diagnostics per layer (logged as moe_*/<layer>): load (fraction of
assignments per expert), load_ratio (max / min load), dropped (fraction of assignments
dropped), router entropy, the auxiliary loss and router z-loss (unweighted), the
balancing bias; and "loss", the weighted auxiliary losses added to the objective.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lm.kernels.grouped_matmul import grouped_matmul
from lm.errors import ConfigError
from lm.model.layers import DTYPES, hidden_std, param
from lm.model.mixers.base import ChannelMixer, register
from lm.schema import knob
from lm.model.mixers.mlp import MLP, MLPConfig, activation

if TYPE_CHECKING:
    from lm.model.config import ModelConfig


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts (channel code "e")."""
    n_experts: int = knob(8, doc="Routed experts per MoE layer.")
    top_k: int = knob(2, doc="Experts each token is routed to.")
    ratio: float = knob(4.0, doc="Expert hidden width = ratio * d_model.")
    activation: Literal["gelu", "swiglu"] = knob("gelu", doc="The experts' activation.")
    n_shared_experts: int = knob(0, doc="Always-on experts of the same width.")
    router: Literal["softmax", "sigmoid"] = knob("softmax", doc="How router logits become "
                                                             "gate scores.")
    renormalize: bool = knob(True, doc="Gate weights renormalised over the chosen top_k.")
    aux_loss: float = knob(0.01, roles={"free_init"},
                           doc="Load-balancing loss coefficient (Switch / GShard form).")
    router_z_loss: float = knob(0.001, roles={"free_init"},
                                doc="Mean logsumexp(router logits)^2 coefficient (ST-MoE).")
    bias_rate: float = knob(
        0.0, doc="Auxiliary-loss-free balancing: a per-expert bias added to the scores for "
                 "choosing experts, moved by bias_rate * sign(mean load - load) after every "
                 "step, outside the gradient (DeepSeek-V3 uses 0.001). 0 = off.")
    capacity_factor: float = knob(
        0.0, doc="Assignments an expert takes from a group of tokens: capacity_factor x "
                 "tokens x top_k / n_experts; 0 = dropless.")
    impl: Literal["auto", "ragged", "blocked", "megablox"] = knob(
        "auto", roles={"free_init"}, doc="The grouped matmul's implementation.")

    def d_expert(self, d_model: int) -> int:
        return int(self.ratio * d_model)


def capacity(cfg: MoEConfig, tokens: int) -> int:
    """Assignments an expert takes from a group of `tokens` tokens (capacity mode)."""
    return max(1, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_experts))


@dataclass(frozen=True)
class _Axes:
    """Mesh axes the per-shard dispatch talks over (empty: no such split)."""
    tokens: tuple[str, ...] = ()  # that split the tokens (the dropped count is summed)
    experts: tuple[str, ...] = ()  # that split the experts (the all-to-alls)


def route(cfg: MoEConfig, x_LD, w_router, bias):
    """Top-k experts and gate weights per token (any leading dims L), and the routing
    statistics over all of them. Plain jnp over the global batch: under a mesh the
    compiler partitions it (per-token work; the statistics are means), so they, the
    auxiliary losses and their gradients are the single-device ones. Returns
    (experts_LK, gates_LK, stats)."""
    logits = jnp.einsum("...d,de->...e", x_LD.astype(jnp.float32), w_router.astype(jnp.float32))
    scores = jax.nn.softmax(logits, -1) if cfg.router == "softmax" else jax.nn.sigmoid(logits)
    choose = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    _, experts = jax.lax.top_k(choose, cfg.top_k)
    gates = jnp.take_along_axis(scores, experts, -1)
    if cfg.renormalize:
        gates = gates / jnp.sum(gates, -1, keepdims=True)

    e = logits.shape[-1]
    lead = tuple(range(logits.ndim - 1))
    load_E = jnp.mean(jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), -2), lead) / cfg.top_k
    probs = scores / jnp.sum(scores, -1, keepdims=True)  # = scores for softmax
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), -1)
    stats = {
        # Switch Transformer: E * sum_e (fraction routed to e) * (mean probability of e);
        # 1 at perfect balance. The fraction carries no gradient, the probability does.
        "aux_loss": e * jnp.sum(jax.lax.stop_gradient(load_E) * jnp.mean(probs, lead)),
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, -1))),
        "router_entropy": jax.lax.stop_gradient(jnp.mean(entropy)),
        "load": jax.lax.stop_gradient(load_E),
        "load_ratio": jax.lax.stop_gradient(jnp.max(load_E) / jnp.min(load_E)),
    }
    return experts, gates, stats


def _expert_ffn(cfg: MoEConfig, rows_MD, ids_M, n_local: int, w_ins, w_out, presorted: bool):
    """Rows tagged with a local expert id (n_local = padding) through their experts.
    `presorted`: the rows are in expert order already, padding last (no all-to-all
    interleaved them by source shard)."""
    sizes = jnp.zeros((n_local + 1,), jnp.int32).at[ids_M].add(1)[:n_local]
    order = None if presorted else jnp.argsort(ids_M, stable=True)
    x = rows_MD if presorted else rows_MD[order]
    pre = tuple(grouped_matmul(x, w, sizes, cfg.impl) for w in w_ins)
    y = grouped_matmul(activation(cfg.activation, pre), w_out, sizes, cfg.impl)
    return y if presorted else jnp.zeros_like(y).at[order].set(y)


def dispatch(cfg: MoEConfig, x_ND, experts_NK, w_ins, w_out, axes: _Axes, expert_ways: int):
    """One shard's tokens through their experts: (y_NKD, each assignment's expert output
    (zero if dropped), and the number of dropped assignments over all shards). The
    shard holds n_experts / expert_ways experts (w_ins / w_out lead with that many); with
    the expert hidden dim split, y is this shard's partial sum (the caller adds them).
    No collective here but the all-to-alls, which are linear: the same code is right
    under jax.shard_map without replication checks (which the Pallas kernel needs)."""
    n, d = x_ND.shape
    k, e = cfg.top_k, cfg.n_experts
    n_local = e // expert_ways

    # Assignments sorted by expert (token order within one): each destination shard's
    # are contiguous, and an assignment's rank within its expert decides capacity.
    a = n * k
    expert_A = experts_NK.reshape(a)
    order = jnp.argsort(expert_A, stable=True)
    expert_S = expert_A[order]
    token_S = order // k
    counts_E = jnp.zeros((e,), jnp.int32).at[expert_A].add(1)
    rank_S = jnp.arange(a) - (jnp.cumsum(counts_E) - counts_E)[expert_S]
    if cfg.capacity_factor > 0:
        cap = capacity(cfg, n)
        keep_S = rank_S < cap
        slots = min(a, n_local * cap)  # per destination shard
    else:
        keep_S = jnp.ones((a,), bool)
        slots = a
    dropped = jnp.sum(~keep_S).astype(jnp.float32)
    dropped = jax.lax.psum(dropped, axes.tokens) if axes.tokens else dropped

    # Send buffer: destination shard x slot. Dropped assignments go nowhere (index past
    # the end, dropped by the scatter); empty slots carry the padding id.
    dest_S = expert_S // n_local
    kept_per_dest = jnp.zeros((expert_ways,), jnp.int32).at[dest_S].add(keep_S.astype(jnp.int32))
    first_of_dest = jnp.cumsum(kept_per_dest) - kept_per_dest
    slot_S = jnp.cumsum(keep_S) - 1 - first_of_dest[dest_S]
    index_S = jnp.where(keep_S, dest_S * slots + slot_S, expert_ways * slots)
    send = jnp.zeros((expert_ways * slots, d), x_ND.dtype).at[index_S].set(
        x_ND[token_S], mode="drop")
    send_ids = jnp.full((expert_ways * slots,), n_local, jnp.int32).at[index_S].set(
        expert_S % n_local, mode="drop")
    if axes.experts:
        send = jax.lax.all_to_all(send.reshape(expert_ways, slots, d), axes.experts, 0, 0,
                                  tiled=True).reshape(expert_ways * slots, d)
        send_ids = jax.lax.all_to_all(send_ids.reshape(expert_ways, slots), axes.experts,
                                      0, 0, tiled=True).reshape(-1)
    out = _expert_ffn(cfg, send, send_ids, n_local, w_ins, w_out, presorted=not axes.experts)
    if axes.experts:
        out = jax.lax.all_to_all(out.reshape(expert_ways, slots, d), axes.experts, 0, 0,
                                 tiled=True).reshape(expert_ways * slots, d)

    # Back to (token, k) order.
    y_S = jnp.where(keep_S[:, None], out.at[index_S].get(mode="fill", fill_value=0), 0)
    y_A = jnp.zeros((a, d), y_S.dtype).at[order].set(y_S)
    return y_A.reshape(n, k, d), dropped


@register
class MoE(ChannelMixer):
    name, code, Config = "moe", "e", MoEConfig

    @classmethod
    def validate(cls, cfg: "ModelConfig") -> None:
        m = cfg.moe
        if m.n_experts < 1:
            raise ConfigError(f"model.moe.n_experts must be >= 1, got {m.n_experts}")
        if not 1 <= m.top_k <= m.n_experts:
            raise ConfigError(f"model.moe.top_k={m.top_k} must be in [1, model.moe.n_experts"
                              f"={m.n_experts}]")
        if m.d_expert(cfg.d_model) <= 0:
            raise ConfigError(f"model.moe.ratio={m.ratio} gives no hidden units")
        for key in ("n_shared_experts", "aux_loss", "router_z_loss", "bias_rate",
                    "capacity_factor"):
            if getattr(m, key) < 0:
                raise ConfigError(f"model.moe.{key} must be >= 0, got {getattr(m, key)}")

    @classmethod
    def validate_mesh(cls, cfg: "ModelConfig", mesh_shape: dict) -> None:
        ways = mesh_shape.get("expert", 1)
        if cfg.moe.n_experts % ways:
            raise ConfigError(f"mesh.expert={ways} does not divide model.moe.n_experts="
                              f"{cfg.moe.n_experts}")

    @classmethod
    def engine_refusal(cls, cfg: "ModelConfig") -> str | None:
        if cfg.moe.capacity_factor > 0:  # which assignments drop depends on the batch
            return ("model.moe.capacity_factor > 0 drops tokens by what else is in the "
                    "batch (set it to 0, dropless, for the engine)")
        return None

    @classmethod
    def inactive_params(cls, cfg: "ModelConfig") -> int:
        m = cfg.moe
        per_expert = (3 if m.activation == "swiglu" else 2) * cfg.d_model * m.d_expert(cfg.d_model)
        return (m.n_experts - m.top_k) * per_expert

    @classmethod
    def update_outside_gradient(cls, cfg: "ModelConfig", old: dict, new: dict,
                                stats: dict) -> dict:
        """The balancing bias: toward experts loaded below the mean, away from the others
        (leading axes of `load`, e.g. stacked layers, broadcast)."""
        if not cfg.moe.bias_rate:
            return new
        load = stats["load"]
        step = cfg.moe.bias_rate * jnp.sign(jnp.mean(load, -1, keepdims=True) - load)
        return dict(new, router_bias=old["router_bias"] + step.astype(old["router_bias"].dtype))

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        m = self.moe = cfg.moe
        pdt = DTYPES[cfg.param_dtype]
        self.compute_dtype = DTYPES[cfg.compute_dtype]
        d, f, e = cfg.d_model, m.d_expert(cfg.d_model), m.n_experts
        self.router = param(rngs, (d, e), ("embed", "router"), hidden_std(cfg, d), pdt)
        if m.bias_rate:
            self.router_bias = nnx.Param(jnp.zeros((e,), jnp.float32), logical_axes=("router",))
        w_axes = ("experts", "embed", "expert_mlp")
        self.w_in = param(rngs, (e, d, f), w_axes, hidden_std(cfg, d), pdt)
        if m.activation == "swiglu":
            self.w_gate = param(rngs, (e, d, f), w_axes, hidden_std(cfg, d), pdt)
        out_std = hidden_std(cfg, f) / math.sqrt(2 * cfg.n_layers)
        self.w_out = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), out_std, pdt)
        if m.n_shared_experts:  # the dense MLP, n_shared x the expert width
            shared = MLPConfig(activation=m.activation, ratio=m.n_shared_experts * m.ratio)
            self.shared = MLP(dataclasses.replace(cfg, mlp=shared), rngs)

    def __call__(self, x_BTD: jax.Array):
        from lm.parallel.sharding import active_mesh, shard_axes, spec_for_names

        m, cdt = self.moe, self.compute_dtype
        b, t, d = x_BTD.shape
        w_ins = (self.w_in[...].astype(cdt),)
        if m.activation == "swiglu":
            w_ins = (self.w_gate[...].astype(cdt),) + w_ins
        w_out = self.w_out[...].astype(cdt)
        bias = self.router_bias[...] if m.bias_rate else None
        router = self.router[...]

        experts_BTK, gates_BTK, stats = route(m, x_BTD, router, bias)
        mesh = active_mesh()
        if mesh is None or mesh.size == 1:
            y_NKD, dropped = dispatch(m, x_BTD.reshape(b * t, d), experts_BTK.reshape(b * t, -1),
                                      w_ins, w_out, _Axes(), 1)
            y_BTKD = y_NKD.reshape(b, t, m.top_k, d)
        else:
            f = w_out.shape[1]
            axes = _Axes(tokens=shard_axes("batch", b) + shard_axes("seq", t),
                         experts=shard_axes("experts", m.n_experts))
            hidden = shard_axes("expert_mlp", f)
            ways = math.prod(mesh.shape[a] for a in axes.experts)

            def per_shard(x, experts, w_ins, w_out):
                bl, tl, _ = x.shape
                y, dropped = dispatch(m, x.reshape(bl * tl, d), experts.reshape(bl * tl, -1),
                                      w_ins, w_out, axes, ways)
                return y.reshape(1, bl, tl, m.top_k, d), dropped

            x_spec = spec_for_names(("batch", "seq", None), x_BTD.shape)
            w_in_spec = spec_for_names(("experts", None, "expert_mlp"), (m.n_experts, d, f))
            w_out_spec = spec_for_names(("experts", "expert_mlp", None), w_out.shape)
            # Partial sums over the hidden dim's shards come out stacked on a leading axis
            # and are added outside (the compiler's reduction, with its correct gradient).
            partial_spec = P(hidden or None, *x_spec[:2], None, None)
            partials, dropped = jax.shard_map(
                per_shard, mesh=mesh,
                in_specs=(x_spec, x_spec, tuple(w_in_spec for _ in w_ins), w_out_spec),
                out_specs=(partial_spec, P()), check_vma=False,
            )(x_BTD, experts_BTK, w_ins, w_out)
            y_BTKD = jnp.sum(partials, 0)
        y = jnp.einsum("btkd,btk->btd", y_BTKD.astype(jnp.float32), gates_BTK).astype(x_BTD.dtype)
        stats["dropped"] = dropped / (b * t * m.top_k)

        if m.n_shared_experts:
            y = y + self.shared(x_BTD)
        stats["loss"] = m.aux_loss * stats["aux_loss"] + m.router_z_loss * stats["z_loss"]
        if bias is not None:
            stats["bias"] = jax.lax.stop_gradient(bias)
        return y, stats
