"""Decoder-only stack: blocks with pre / post / peri / out norm placement, optional LayerNorm
scaling, parallel mixer + channel mixer, optionally scanned over layers. The mixers are
plug-ins (lm/model/mixers); nothing here depends on which ones a layer uses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model.config import ModelConfig
from lm.model import mixers, recursive
from lm.model.layers import DTYPES, Norm, param
from lm.parallel.sharding import constrain

ACT = ("batch", "seq", "act_embed")  # logical names of the residual stream


REMAT_POLICIES = {
    "full": None,  # save nothing inside the block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Norms, the layer's sequence mixer (`mixer`: attention, Mamba-2, retention, ...) and
    channel mixer (`channel`: the MLP, ...), wired by the norm placement."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
        pdt = DTYPES[cfg.param_dtype]
        self.position = cfg.norm_position
        self.parallel = cfg.parallel_block
        self.layernorm_scaling = cfg.layernorm_scaling
        sequence, channel = mixers.sequence_mixer(cfg, layer), mixers.channel_mixer(cfg, layer)
        self.mixer = sequence(sequence.layer_config(cfg, layer), rngs)
        self.channel = channel(channel.layer_config(cfg, layer), rngs)
        # A removed sublayer (mixers/skip.py, pruning) takes its own norms with it; with
        # post placement the norms sit on the residual stream and stay.
        self.has_mixer, self.has_channel = not sequence.empty, not channel.empty
        post = self.position == "post"
        if self.position != "out":  # "out" normalises only the sublayers' outputs
            if post or self.has_mixer or (self.parallel and self.has_channel):
                self.norm1 = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)
            if not (self.parallel and not post) and (post or self.has_channel):
                self.norm2 = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)
        if self.position in ("peri", "out"):  # each sublayer's output normalised
            if self.has_mixer:
                self.attn_out_norm = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)
            if self.has_channel:
                self.mlp_out_norm = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)

    def mixer_input(self, x, layer_index):
        """What the sequence mixer sees of the block's input x (its input norm applied
        where the norm placement has one), as __call__ computes it."""
        ls = jax.lax.rsqrt(layer_index + 1.0) if self.layernorm_scaling else 1.0
        if self.position in ("post", "out") or not hasattr(self, "norm1"):
            return x
        return self.norm1(x) * ls

    def __call__(self, x, positions, segment_ids, layer_index, cache=None, cache_index=None):
        """-> (x, cache, max attention logit, the channel mixer's aux dict). layer_index
        counts from 0; LayerNorm scaling multiplies norm outputs by 1/sqrt(layer_index + 1)
        (Sun et al. 2025, 'The Curse of Depth')."""
        ls = jax.lax.rsqrt(layer_index + 1.0) if self.layernorm_scaling else 1.0
        channel_aux = {}

        def mix(h):
            return self.mixer(h, positions, segment_ids, cache, cache_index)

        def channel(h):
            out = self.channel(h)
            if isinstance(out, tuple):  # (y, aux): a mixer with diagnostics / a loss
                out, aux = out
                channel_aux.update({k if k == "loss" else f"{self.channel.name}_{k}": v
                                    for k, v in aux.items()})
            return out

        if self.position == "post":
            a, cache, max_logit = mix(x)
            if self.parallel:
                x = self.norm1(x + a + channel(x)) * ls
            else:
                x = self.norm1(x + a) * ls
                x = self.norm2(x + channel(x)) * ls
            return x, cache, max_logit, channel_aux

        # pre / peri: norms on the sublayers' inputs, and / or (peri, out) on their
        # outputs; a removed sublayer has neither (its zero output is added as it is).
        inputs = self.position != "out"
        outputs = self.position in ("peri", "out")
        h = self.norm1(x) * ls if inputs and hasattr(self, "norm1") else x
        a, cache, max_logit = mix(h)
        if outputs and self.has_mixer:
            a = self.attn_out_norm(a)
        if self.parallel:
            m = channel(h)
            x = x + a + (self.mlp_out_norm(m) if outputs and self.has_channel else m)
        else:
            x = x + a
            m = channel(self.norm2(x) * ls if inputs and self.has_channel else x)
            x = x + (self.mlp_out_norm(m) if outputs and self.has_channel else m)
        return x, cache, max_logit, channel_aux


def _rms(x) -> jax.Array:
    """Root mean square of the residual stream (a per-layer growth diagnostic; no
    gradient flows through it)."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        assert cfg.vocab_size > 0, "resolve model.vocab_size from the tokenizer first"
        self.cfg = cfg
        pdt = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           cfg.init_std, pdt)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs):
                return Block(cfg, rngs, 0)

            self.blocks = make_blocks(rngs)
        else:  # one block per layer, or fewer shared by the layers (recursion.blocks)
            self.blocks = nnx.List([Block(cfg, rngs, recursive.first_layer(cfg, k))
                                    for k in range(recursive.n_blocks(cfg))])
            if cfg.recursion.relax_rank:
                self.relax = recursive.Relaxations(cfg, self.blocks, rngs)
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)
        if cfg.norm_position != "post":
            self.final_norm = Norm(cfg.d_model, cfg.norm, "embed", pdt, cfg.norm_eps)
        if not cfg.tie_embeddings:
            # muP zero-initialises the readout; standard init uses init_std.
            std = 0.0 if cfg.init == "mup" else cfg.init_std
            self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                 std, pdt)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
                 cache_index=None):
        """Returns (logits_BTV in float32, aux). aux["attn_logit_max"] (largest attention
        logit) and aux["resid_rms"] (RMS of the residual stream after the block) are
        [n_layers]; aux["channel"] maps the index of each layer whose channel mixer
        reports aux (MoE) to that dict; with a cache, aux["cache"] is the updated cache."""
        x, aux = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache, cache_index)
        return self.readout(x), aux

    def readout_weight(self) -> jax.Array:
        """The output projection as [d_model, vocab] (the embedding, transposed, if tied)."""
        if self.cfg.tie_embeddings:
            return self.embed[...].T
        return self.unembed[...]

    def readout(self, x_BTD, weight_DV=None) -> jax.Array:
        """Final hidden states -> logits in float32 (muP output scaling and the soft-cap
        applied). `weight_DV`: readout_weight(), passed in by a caller that maps over
        chunks of positions (lm.train.step's chunked cross-entropy)."""
        cfg = self.cfg
        w = self.readout_weight() if weight_DV is None else weight_DV
        logits = jnp.einsum("btd,dv->btv", x_BTD, w.astype(DTYPES[cfg.compute_dtype]),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        if cfg.init == "mup":
            logits = logits * (cfg.mup_base_width / cfg.d_model)
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return logits

    def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
                      cache_index=None, taps: tuple[int, ...] = ()):
        """The final (normalised) hidden states [B, T, d_model] and aux (see __call__).
        taps: layers whose output (the residual stream after the block, [B, T, d_model])
        aux["taps"] lists, in that order (distillation's hidden-state loss); -1: the
        input of layer 0 (the embedding)."""
        cfg = self.cfg
        cdt = DTYPES[cfg.compute_dtype]
        b, t = tokens_BT.shape
        if positions_BT is None:
            start = 0 if cache_index is None else cache_index
            positions_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        # Gather from a table whole along embed (FSDP all-gathers it, as for any weight
        # about to be used) so the lookup's output can take the batch sharding directly.
        table_VD = constrain(self.embed[...].astype(cdt), ("vocab", "act_embed"))
        x = constrain(table_VD[tokens_BT], ACT)
        if cfg.scale_embeddings:  # Gemma: sqrt(d_model), rounded to the compute dtype
            x = x * jnp.asarray(math.sqrt(cfg.d_model), cdt)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        embedded = x

        def apply_block(block, x, layer_index, layer_cache):
            return block(x, positions_BT, segment_ids_BT, layer_index, layer_cache, cache_index)

        if cfg.remat != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[cfg.remat])

        if cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0, 0))
            def run(x, block, layer_index, layer_cache):
                x, layer_cache, max_logit, ch = apply_block(block, x, layer_index, layer_cache)
                x = constrain(x, ACT)
                return x, layer_cache, (max_logit, _rms(x), ch, x if taps else None)

            layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.float32)
            x, cache, (max_logits, resid_rms, stacked, outs) = run(x, self.blocks, layer_ids,
                                                                   cache)
            tapped = [embedded if i < 0 else outs[i] for i in taps]
            channel_aux = {i: jax.tree.map(lambda v, i=i: v[i], stacked)
                           for i in range(cfg.n_layers)} if stacked else {}
        else:
            max_logits, resid_rms, new_cache, channel_aux, by_layer = [], [], [], {}, {-1: x}
            for i in range(cfg.n_layers):
                block = recursive.layer_block(self, i)
                layer_cache = None if cache is None else cache[i]
                x, layer_cache, m, ch = apply_block(block, x, jnp.float32(i), layer_cache)
                x = constrain(x, ACT)
                max_logits.append(m)
                resid_rms.append(_rms(x))
                new_cache.append(layer_cache)
                if i in taps:
                    by_layer[i] = x
                if ch:
                    channel_aux[i] = ch
            tapped = [by_layer[i] for i in taps]
            max_logits, resid_rms = jnp.stack(max_logits), jnp.stack(resid_rms)
            if cache is not None:
                cache = new_cache

        if cfg.norm_position != "post":
            x = self.final_norm(x)
        aux = {"attn_logit_max": max_logits, "resid_rms": resid_rms, "channel": channel_aux}
        if taps:
            aux["taps"] = tapped
        if cache is not None:
            aux["cache"] = cache
        return x, aux

    def init_cache(self, batch: int, length: int):
        """Decoding state: per layer, a KV cache of `length` slots (attention) or the
        recurrent state (Mamba-2 / retention). A list over layers, or one tree with a
        leading layer axis when the layers are scanned."""
        if self.cfg.scan_layers:
            one = self.blocks.mixer.init_cache(batch, length)
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.cfg.n_layers, *x.shape)), one)
        return [self.blocks[recursive.block_of(self.cfg, i)].mixer.init_cache(batch, length)
                for i in range(self.cfg.n_layers)]

    def init_slot_cache(self, slots: int, pages: int, page_size: int):
        """The batched engine's decoding state (lm/infer), shaped like init_cache's: per
        layer, its mixer's init_slot_cache (a PagedKV page pool, or a state per slot).
        Raises ConfigError naming the first mixer that cannot decode in the engine."""
        from lm.errors import ConfigError
        for mixer in mixers.used_mixers(self.cfg):
            why = mixer.engine_refusal(self.cfg)
            if why:
                raise ConfigError(f"the inference engine cannot run this model: {why}")

        def one(mixer):
            state = mixer.init_slot_cache(slots, pages, page_size)
            if state is None:
                raise ConfigError(f"the inference engine cannot run this model: the "
                                  f"{mixer.name} mixer has no engine decoding state")
            return state

        if self.cfg.scan_layers:
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.cfg.n_layers, *x.shape)),
                                one(self.blocks.mixer))
        return [one(self.blocks[recursive.block_of(self.cfg, i)].mixer)
                for i in range(self.cfg.n_layers)]


def count_params(cfg: ModelConfig) -> dict:
    """Total and non-embedding parameter counts (the embedding table, and an untied
    readout, are the 'embedding' parameters), and the active ones: what one token uses
    (all but the experts it is not routed to; equal to the totals for dense models)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    total = sum(math.prod(x.shape) for x in leaves)
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    inactive = mixers.inactive_params(cfg)
    return {"total": total, "non_embedding": total - embedding,
            "active": total - inactive, "active_non_embedding": total - embedding - inactive}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (active non-embedding params + readout matmul) for
    the matmuls (PaLM appendix B convention; an MoE layer counts the experts a token is
    routed to), plus what each layer's mixers compute beyond their parameters (attention
    scores and values over the causally visible keys, the scan mixers' chunk products;
    see each mixer's extra_flops_per_token). A recursive model's layers each run a whole
    block: its FLOPs are its untied parent's (lm/model/recursive.py)."""
    n = (count_params(recursive.untied(cfg))["active_non_embedding"]
         + cfg.vocab_size * cfg.d_model)
    return 6 * n + mixers.extra_flops_per_token(cfg, seq_len)


def update_outside_gradient(cfg: ModelConfig, old: dict, new: dict, channel_aux: dict) -> dict:
    """Params after the optimizer step -> with each channel mixer's rule-based updates
    applied (ChannelMixer.update_outside_gradient; only mixers that report aux have
    any). `channel_aux`: the model's aux["channel"], per layer."""
    if not channel_aux:
        return new
    def own(mixer, aux: dict) -> dict:  # Block prefixed the keys with the mixer's name
        prefix = mixer.name + "_"
        return {k[len(prefix):]: v for k, v in aux.items() if k.startswith(prefix)}

    blocks = dict(new["blocks"])
    if cfg.scan_layers:  # one mixer type, parameters and aux stacked over the layers
        stacked = jax.tree.map(lambda *v: jnp.stack(v),
                               *(channel_aux[i] for i in range(cfg.n_layers)))
        mixer = mixers.channel_mixer(cfg, 0)
        blocks["channel"] = mixer.update_outside_gradient(
            cfg, old["blocks"]["channel"], new["blocks"]["channel"], own(mixer, stacked))
    else:
        for i, aux in channel_aux.items():
            mixer = mixers.channel_mixer(cfg, i)
            blocks[i] = dict(blocks[i], channel=mixer.update_outside_gradient(
                cfg, old["blocks"][i]["channel"], new["blocks"][i]["channel"], own(mixer, aux)))
    return dict(new, blocks=blocks)


def param_axes(model: nnx.Module) -> dict:
    """Logical axis names of every parameter, as a pure dict shaped like the params.
    Layer-stacked parameters (scan_layers) get a leading "layers" axis."""
    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = tuple(var.get_metadata()["logical_axes"])
        axes = ("layers",) * (len(var.get_value().shape) - len(axes)) + axes
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes
    return out
