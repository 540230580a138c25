"""The mixer plug-in seam: the base classes, the registry (`register`), and what the
rest of the model asks of the mixers in use (validation, FLOPs, parameter counts, the
matrices LoRA and recursion may adapt). The package (lm/model/mixers/__init__.py)
documents how to add a mixer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from flax import nnx

from lm import schema
from lm.errors import ConfigError

if TYPE_CHECKING:
    from lm.model.config import ModelConfig


class _Mixer(nnx.Module):
    name: ClassVar[str]  # its config section: model.<name>
    code: ClassVar[str]  # its letter in the layer pattern
    Config: ClassVar[type]  # frozen dataclass of its knobs
    # The matrices LoRA (lora.targets) and recursion's relaxations may adapt: parameter
    # name -> its number of leading fan-in axes (the ones its matmul contracts), e.g.
    # attention's wo [heads, head_dim, embed] -> 2. A weight [in..., out...] gets
    # adapters A [in..., rank], B [rank, out...]. Stacked experts are not declared.
    adaptable: ClassVar[dict[str, int]] = {}
    # A removed sublayer (lm/model/mixers/skip.py): output zero, no parameters; the block
    # leaves out its norms.
    empty: ClassVar[bool] = False
    # The parameter whose zeroing makes this mixer's output zero (its output projection,
    # with no bias after it): depth pruning (lm/compress/prune.py) scores a sublayer by
    # the parent with it zeroed. None: not declared (such a layer is not scored).
    output: ClassVar[str | None] = None

    @classmethod
    def validate(cls, cfg: "ModelConfig") -> None:
        """Raise ConfigError (one line naming the key) for settings this mixer refuses."""

    @classmethod
    def layer_config(cls, cfg: "ModelConfig", layer: int) -> "ModelConfig":
        """The config this mixer is built with in layer `layer` (0-based): cfg itself
        unless a knob varies by layer (attention's window_pattern: global layers see no
        window). Layers whose configs differ cannot share one block (scan_layers,
        recursion)."""
        return cfg

    @classmethod
    def validate_mesh(cls, cfg: "ModelConfig", mesh_shape: dict[str, int]) -> None:
        """Raise ConfigError for a mesh this mixer cannot be split over (e.g. an expert
        axis that does not divide the experts)."""

    @classmethod
    def extra_flops_per_token(cls, cfg: "ModelConfig", seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) beyond 6 x its active parameters,
        e.g. attention scores, the scan's chunk products."""
        return 0.0

    @classmethod
    def engine_refusal(cls, cfg: "ModelConfig") -> str | None:
        """Why the batched engine (lm/infer) cannot run this mixer with these settings
        (one line), e.g. routing that depends on the other rows of the batch; None: it can."""
        return None

    @classmethod
    def inactive_params(cls, cfg: "ModelConfig") -> int:
        """Parameters of one layer's mixer that a token does not use (the experts it is not
        routed to): total minus these is the active count FLOPs and MFU are based on."""
        return 0


class SequenceMixer(_Mixer):
    """Mixes along the sequence. `__call__(x_BTD, positions_BT, segment_ids_BT, cache=None,
    cache_index=None) -> (y_BTD, new_cache or None, max_logit)`. Documents packed into a
    row (equal segment ids) must never see each other; with a cache (decoding) the new
    tokens continue the cached sequence at `cache_index`."""

    # Whether max_logit is a real max attention logit (else NaN, not logged).
    @classmethod
    def reports_logits(cls, cfg: "ModelConfig") -> bool:
        return False

    def init_cache(self, batch: int, length: int):
        """Decoding state for `batch` rows of up to `length` tokens."""
        raise NotImplementedError

    def init_slot_cache(self, slots: int, pages: int, page_size: int):
        """Decoding state for the batched engine (lm/infer): a PagedKV of `pages` pages of
        `page_size` tokens shared by all sequences (lm/model/paged.py: attention), or a
        state with one row per slot (a recurrent mixer: its init_cache(slots, 0)), which
        the engine fills by a batch-1 prefill and keeps per slot. None: this mixer cannot
        decode in the engine (it refuses the model)."""
        return None


class ChannelMixer(_Mixer):
    """Mixes along the feature dimension, token by token: `__call__(x_BTD) -> y_BTD`, or
    `(y_BTD, aux)` for a mixer with diagnostics: aux is a dict of arrays (logged per layer
    as `<name>_<key>/<layer>`), and its entry "loss", when present, is a scalar added to
    the training objective (e.g. MoE's weighted load-balancing loss)."""

    @classmethod
    def update_outside_gradient(cls, cfg: "ModelConfig", old: dict, new: dict,
                                aux: dict) -> dict:
        """After the optimizer step: this mixer's parameters (pure dicts, before and after
        the step; leading layer axis when scanned) -> the ones to keep, for state moved by
        a rule rather than a gradient (MoE's balancing bias). `aux`: this layer's aux
        (stacked over layers when scanned)."""
        return new


SEQUENCE_MIXERS: dict[str, type[SequenceMixer]] = {}  # by code
CHANNEL_MIXERS: dict[str, type[ChannelMixer]] = {}


def register(cls):
    """Class decorator: make a mixer selectable by its code and give it a config section."""
    table = SEQUENCE_MIXERS if issubclass(cls, SequenceMixer) else CHANNEL_MIXERS
    for other in (*SEQUENCE_MIXERS.values(), *CHANNEL_MIXERS.values()):
        if other.name == cls.name or (other.code == cls.code and other in table.values()):
            raise ValueError(f"mixer {cls.__name__}: name {cls.name!r} or code {cls.code!r} "
                             f"is taken by {other.__name__}")
    schema.register_section("model", cls.name, cls.Config)  # (refuses a non-frozen Config)
    table[cls.code] = cls
    return cls


def all_mixers() -> list[type[_Mixer]]:
    return [*SEQUENCE_MIXERS.values(), *CHANNEL_MIXERS.values()]


def sequence_mixer(cfg: "ModelConfig", layer: int) -> type[SequenceMixer]:
    return SEQUENCE_MIXERS[cfg.mixer_pattern[layer % len(cfg.mixer_pattern)]]


def channel_mixer(cfg: "ModelConfig", layer: int) -> type[ChannelMixer]:
    return CHANNEL_MIXERS[cfg.channel_pattern[layer % len(cfg.channel_pattern)]]


def used_mixers(cfg: "ModelConfig") -> list[type[_Mixer]]:
    """The mixer classes some layer of `cfg` uses, in a fixed order."""
    used = {sequence_mixer(cfg, i) for i in range(cfg.n_layers)}
    used |= {channel_mixer(cfg, i) for i in range(cfg.n_layers)}
    return [m for m in all_mixers() if m in used]


def adaptable_matrices(cfg: "ModelConfig", block_params: dict, layer: int) -> dict[tuple, int]:
    """{path in one block's params: fan-in axes} of the matrices that layer `layer`'s
    mixers declare adaptable (`adaptable`), as the block holds them ("mixer" and
    "channel" sub-trees of arrays or shapes)."""
    out = {}
    for slot, mixer in (("mixer", sequence_mixer(cfg, layer)), ("channel", channel_mixer(cfg, layer))):
        params = block_params.get(slot, {})
        for name, fan_in in mixer.adaptable.items():
            leaf = params.get(name)
            if leaf is not None and hasattr(leaf, "ndim") and leaf.ndim > fan_in:
                out[(slot, name)] = fan_in
    return out


def describe_adaptable() -> str:
    """'attention wq/wk/..., mlp w_in/...': every registered mixer's adaptable matrices."""
    return ", ".join(f"{m.name} {'/'.join(m.adaptable)}" for m in all_mixers() if m.adaptable)


def _check_pattern(key: str, pattern: str, table: dict) -> None:
    if not pattern or set(pattern) - set(table):
        choices = ", ".join(f"{code} ({m.name})" for code, m in table.items())
        raise ConfigError(f"{key}={pattern!r} must be a non-empty string of {choices}")


def layer_configs(cfg: "ModelConfig", layer: int) -> tuple:
    """(sequence mixer's, channel mixer's) config in layer `layer` (_Mixer.layer_config)."""
    return (sequence_mixer(cfg, layer).layer_config(cfg, layer),
            channel_mixer(cfg, layer).layer_config(cfg, layer))


def validate(cfg: "ModelConfig") -> None:
    """The patterns, then each mixer in use checks its own settings."""
    _check_pattern("model.mixer_pattern", cfg.mixer_pattern, SEQUENCE_MIXERS)
    _check_pattern("model.channel_pattern", cfg.channel_pattern, CHANNEL_MIXERS)
    for mixer in used_mixers(cfg):
        mixer.validate(cfg)


def validate_mesh(cfg: "ModelConfig", mesh_shape: dict[str, int]) -> None:
    for mixer in used_mixers(cfg):
        mixer.validate_mesh(cfg, mesh_shape)


def inactive_params(cfg: "ModelConfig") -> int:
    return sum(sequence_mixer(cfg, i).inactive_params(layer_configs(cfg, i)[0])
               + channel_mixer(cfg, i).inactive_params(layer_configs(cfg, i)[1])
               for i in range(cfg.n_layers))


def extra_flops_per_token(cfg: "ModelConfig", seq_len: int) -> float:
    return sum(sequence_mixer(cfg, i).extra_flops_per_token(layer_configs(cfg, i)[0], seq_len)
               + channel_mixer(cfg, i).extra_flops_per_token(layer_configs(cfg, i)[1], seq_len)
               for i in range(cfg.n_layers))


def logit_layers(cfg: "ModelConfig") -> tuple[int, ...]:
    """Indices of the layers whose sequence mixer reports a max attention logit."""
    return tuple(i for i in range(cfg.n_layers) if sequence_mixer(cfg, i).reports_logits(cfg))


def scan_flops_per_token(cfg: "ModelConfig", seq_len: int, chunk: int, heads: int,
                         dk: int, dv: int) -> float:
    """Training FLOPs per token of kernels/scan's chunked recurrence beyond the mixer's
    projections: per head and chunk of C tokens, q k^T [C, C] (2 C Dk per token), scores
    times v (2 C Dv), the carried state's read q S and update k^T v (2 Dk Dv each); the
    backward pass costs twice the forward."""
    c = min(chunk, seq_len)
    return 3 * heads * (2 * c * (dk + dv) + 4 * dk * dv)


def sharded_linear_scan(q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, *, segment_ids, initial_state,
                        chunk_size: int, impl: str):
    """lm.kernels.scan.linear_scan for a mixer inside the model: per shard of the active mesh
    when it runs the Pallas kernel (a custom call GSPMD would otherwise run replicated,
    after gathering its inputs), as it is for the XLA path (which GSPMD partitions).
    Batch rows shard over the batch rules (data, fsdp), heads over the heads rule
    (tensor); the sequence is kept whole (a per-shard scan over part of it would drop the
    state carried in from the earlier part). The q/k groups G: one group (Mamba-2) is
    kept whole; G = H (retention) shards like the heads; otherwise the groups are sharded
    with the heads when the same mesh axes split both, and both are kept whole when they
    would not (a shard must hold the groups of its heads)."""
    from lm.kernels.scan import linear_scan
    from lm.kernels.scan.chunked import scan_impl
    from lm.parallel.sharding import shard_axes, shard_local

    g, h = q_BTGK.shape[2], v_BTHV.shape[2]
    heads = "heads"
    if g == 1:
        groups = None
    elif g == h or shard_axes("heads", g) == shard_axes("heads", h):
        groups = "heads"  # the same mesh axes split both: shard j's heads use its groups
    else:
        groups = heads = None

    def scan(q, k, v, a, seg, *s0):
        return linear_scan(q, k, v, a, segment_ids=seg, initial_state=s0[0] if s0 else None,
                           chunk_size=chunk_size, impl=impl)

    args = (q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, segment_ids)
    state = ("batch", heads, None, None)
    names = [("batch", None, groups, None)] * 2 + [("batch", None, heads, None),
                                                   ("batch", None, heads), ("batch", None)]
    if initial_state is not None:
        args, names = args + (initial_state,), names + [state]
    if scan_impl(impl) != "pallas":
        return scan(*args)
    out_names = (("batch", None, heads, None), state)
    return shard_local(scan, tuple(names), out_names)(*args)

