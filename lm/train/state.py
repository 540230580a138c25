"""From a config and a mesh to the pieces of a run: model graph, parameter axes,
optimizer, shardings, and the train state {"params", "opt_state", "step", "rng"}
(created under jit with out_shardings, so every parameter is born on its shard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lm.compress import sparsity
from lm.compress import quantize
from lm.compress.distill import init_projection, projection_shape
from lm.kernels.dispatch import compiling_for
from lm.config import ConfigError, TrainConfig
from lm.data import ROW_DTYPES
from lm.model import mixers, param_axes
from lm.optim import make_optimizer, schedule
from lm.optim import state_shardings as optim_state_shardings
from lm.peft import make_model
from lm.parallel.mesh import make_mesh
from lm.parallel.sharding import (activation_sharding, batch_sharding, param_shardings,
                                  parse_rules, replicated)
from lm.parallel.ring import sequence_attention
from lm.post.preference import Objective, needs_reference
from lm.train.step import (loss_chunk_for, make_eval_step, make_preference_eval_step,
                           make_train_step)
from lm.tree import get_path, set_path


@dataclass
class RunPieces:
    cfg: TrainConfig
    mesh: Mesh
    rules: dict
    graphdef: Any
    axes: dict  # logical axis names per parameter
    tx: optax.GradientTransformation
    lr_fn: Callable
    state_shardings: dict
    batch_sharding: NamedSharding
    # The platform kernels are chosen for, when not the mesh's (a CUDA lowering of a CPU
    # mesh's step in tests/unit/test_kernels_lowering.py).
    target_platform: str | None = field(default=None, repr=False)
    # A distilling run's frozen teacher, or a DPO run's frozen reference (without LoRA)
    # (lm/compress/teacher.py Teacher), attached by the commands that train (lm train,
    # lm bench); its params are the step's third argument. None: no such model (and for
    # every command that does not train).
    teacher: Any = field(default=None, repr=False)
    # A sparse run's target matrices: {path in params: fan-in axes} (lm/compress/
    # sparsity.py); {} when sparsity.mode=off. Their masks are state["sparsity"].
    sparse_targets: dict = field(default_factory=dict, repr=False)
    _abstract: dict | None = field(default=None, init=False, repr=False)
    _jitted: dict = field(default_factory=dict, init=False, repr=False)

    def _jit(self, name: str, make: Callable):
        """One jitted function per name and pieces (a fresh jax.jit would trace and
        compile again: lm bench runs the loop several times on one RunPieces)."""
        if name not in self._jitted:
            self._jitted[name] = make()
        return self._jitted[name]

    @property
    def loss_chunk(self) -> int:
        return loss_chunk_for(self.cfg.loss_chunk, self.cfg.model.vocab_size,
                              self.cfg.data.seq_len)

    def _init(self) -> dict:
        model = make_model(self.cfg, nnx.Rngs(params=self.cfg.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros([], jnp.int32),
                "rng": jax.random.PRNGKey(self.cfg.seed + 1), **self._distill_init(),
                **self._sparsity_init(params)}

    def _sparsity_init(self, params: dict) -> dict:
        """{"sparsity": the N:M masks, top-N magnitudes of `params`} of a sparse run,
        else {}."""
        if not self.sparse_targets:
            return {}
        return {"sparsity": sparsity.magnitude_masks(self.cfg.sparsity, params,
                                                     self.sparse_targets)}

    def _distill_init(self) -> dict:
        """{"distill": the hidden-state loss's projection and its optimizer state} when
        the student and teacher widths differ (lm/compress/distill.py), else {}."""
        shape = projection_shape(self.cfg.distill, self.cfg.model.d_model)
        if shape is None:
            return {}
        return {"distill": init_projection(shape, jax.random.PRNGKey(self.cfg.seed + 2))}

    def init_state(self) -> dict:
        return self._jit("init", lambda: jax.jit(self._init, out_shardings=self.state_shardings))()

    def init_params(self, *path: str) -> dict:
        """The seed's init of the params under `path` (e.g. a LoRA run's "adapters"; only
        that part is computed), on their shardings: what init_state holds there."""
        return jax.jit(lambda: get_path(self._init()["params"], path),
                       out_shardings=get_path(self.state_shardings["params"], path))()

    def fresh_state(self, params: dict, masks: dict | None = None) -> dict:
        """A train state around given params (e.g. restored from elsewhere, on their
        shardings): a fresh optimizer state, step 0; a sparse run's `masks` (default: the
        top-N magnitudes of params)."""
        sh = self.state_shardings
        state = {"params": params,
                 "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params),
                 "step": jax.device_put(jnp.zeros([], jnp.int32), sh["step"]),
                 "rng": jax.device_put(jax.random.PRNGKey(self.cfg.seed + 1), sh["rng"])}
        if "distill" in sh:
            state["distill"] = jax.jit(lambda: self._distill_init()["distill"],
                                       out_shardings=sh["distill"])()
        if "sparsity" in sh:
            state["sparsity"] = (jax.device_put(masks, sh["sparsity"]) if masks is not None
                                 else jax.jit(lambda p: self._sparsity_init(p)["sparsity"],
                                              out_shardings=sh["sparsity"])(params))
        return state

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state (the target of a resharding restore).
        Traced once and kept: start-up asks for it several times."""
        if self._abstract is None:
            self._abstract = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                jax.eval_shape(self._init), self.state_shardings)
        return self._abstract

    def traced_with_mesh(self, fn):
        """fn traced with the activation constraints of this mesh, and with kernels chosen
        for its devices' platform (a TPU mesh on a CPU host: `lm compile`)."""
        platform = self.target_platform or self.mesh.devices.flat[0].platform

        def wrapped(*args):
            with activation_sharding(self.mesh, self.rules), compiling_for(platform), \
                    sequence_attention(self.cfg.mesh.sequence_attention):
                return fn(*args)
        return wrapped

    def objective(self, cfg: TrainConfig | None = None) -> Objective | None:
        """The step's preference objective (lm/post/preference.py) of `cfg` (default: this
        run's; a batched trial's has traced coefficients), or None (the LM loss)."""
        cfg = cfg or self.cfg
        if cfg.objective == "lm":
            return None
        reference = base = None
        if needs_reference(cfg.objective):
            reference = "lora_base" if cfg.lora.rank else "argument"
        if reference == "lora_base":  # the base Transformer's graph: its params are ours
            from lm.model import Transformer
            base = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[0]
        return Objective(cfg.objective, cfg.preference, reference, base)

    def train_step(self):
        """The jitted, state-donating train step with explicit in/out shardings; with a
        teacher (or a DPO reference), (state, batch, its params) -> (state, metrics), the
        frozen params on their own shardings (the same mesh and rules), never donated."""
        distill, objective = None, self.objective()
        if self.teacher is not None and objective is None:
            distill = (self.teacher.pieces.graphdef, self.cfg.distill, self.teacher.plan)
        step = make_train_step(self.graphdef, self.tx, self.lr_fn, self.cfg.optim.z_loss,
                               self.cfg.grad_accum, self.loss_chunk,
                               # LoRA freezes the whole base, MoE's balancing bias included
                               None if self.cfg.lora.rank else self.cfg.model, distill,
                               self._sparsity_hook(), objective)
        in_shardings = (self.state_shardings, self.batch_sharding)
        if self.teacher is not None:
            in_shardings += (self.teacher.param_shardings,)
        return jax.jit(self.traced_with_mesh(step), in_shardings=in_shardings,
                       out_shardings=(self.state_shardings, replicated(self.mesh)),
                       donate_argnums=0)

    def _sparsity_hook(self):
        """(sparsity section, target fan-ins) of a sparse run's step, else None."""
        return (self.cfg.sparsity, self.sparse_targets) if self.sparse_targets else None

    def eval_step(self):
        return self.params_batch_fn("eval", make_eval_step(self.graphdef, self.loss_chunk))

    def preference_eval_step(self):
        """(params, batch of pairs[, reference params]) -> the objective's summed metrics
        (lm/train/step.py make_preference_eval_step), jitted like eval_step."""
        in_shardings = (self.state_shardings["params"], self.batch_sharding)
        if self.teacher is not None:
            in_shardings += (self.teacher.param_shardings,)
        fn = make_preference_eval_step(self.graphdef, self.objective(), self.loss_chunk)
        return self._jit("preference_eval", lambda: jax.jit(
            self.traced_with_mesh(fn), in_shardings=in_shardings,
            out_shardings=replicated(self.mesh)))

    def params_batch_fn(self, name: str, fn: Callable):
        """fn(params, batch) -> replicated outputs, jitted on this mesh like eval_step:
        the evaluations beyond the loss (lm/evals) reuse the sharding and kernel choice."""
        return self._jit(name, lambda: jax.jit(
            self.traced_with_mesh(fn),
            in_shardings=(self.state_shardings["params"], self.batch_sharding),
            out_shardings=replicated(self.mesh)))

    def abstract_batch(self) -> dict:
        shape = (self.cfg.batch_size, self.cfg.data.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, dtype in ROW_DTYPES.items()}

    def compile_train_step(self):
        """Ahead-of-time compiled train step and its per-device memory estimate (bytes)."""
        args = (self.abstract_state(), self.abstract_batch())
        if self.teacher is not None:
            args += (self.teacher.abstract_params(),)
        compiled = self.train_step().lower(*args).compile()
        return compiled, memory_estimate(compiled)

    def global_batch(self, local: dict) -> dict:
        """This process's rows of a batch -> global arrays sharded over the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local.items()}

    def replicated_batch(self, full: dict) -> dict:
        """A batch every process holds in full (evaluation) -> global sharded arrays."""
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding,
                                                lambda idx, v=v: np.asarray(v[idx]))
                for k, v in full.items()}


def memory_estimate(compiled) -> dict:
    """A compiled step's per-device memory analysis (bytes; {} where the backend has
    none)."""
    mem = compiled.memory_analysis()
    return {k: getattr(mem, f"{k}_size_in_bytes", None)
            for k in ("argument", "output", "temp", "alias")} if mem else {}


def build(cfg: TrainConfig, mesh: Mesh | None = None) -> RunPieces:
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    rules = parse_rules(cfg.mesh.rules)
    batch_axes = [a for a in rules["batch"] if mesh.shape[a] > 1]
    ways = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    if (cfg.batch_size // cfg.grad_accum) % ways:
        raise ConfigError(f"batch_size={cfg.batch_size} (per microbatch "
                          f"{cfg.batch_size // cfg.grad_accum}) must divide by the batch "
                          f"mesh axes ({' x '.join(batch_axes)} = {ways})")
    if ways % jax.process_count():
        # Each process loads whole rows of its part of the batch, so processes must split
        # along the batch axes; sequence and tensor axes stay within a process.
        raise ConfigError(f"the batch mesh axes ({' x '.join(batch_axes) or 'none'} = {ways}) "
                          f"must be a multiple of the {jax.process_count()} processes")
    mixers.validate_mesh(cfg.model, dict(mesh.shape))
    seq_ways = mesh.shape["sequence"]
    if cfg.data.seq_len % seq_ways:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must divide by mesh.sequence={seq_ways}")
    abstract = nnx.eval_shape(lambda: make_model(cfg, nnx.Rngs(0)))
    abstract = quantize.tag(abstract, cfg.quant, cfg.model.n_layers)  # quantized training
    graphdef, abstract_params = nnx.split(abstract)
    axes = param_axes(abstract)
    pure = nnx.to_pure_dict(abstract_params)
    p_sh = param_shardings(axes, pure, mesh, rules)
    tx = make_optimizer(cfg.optim, cfg.model, axes, cfg.steps)
    inner_sh, inner_params = p_sh, pure  # what the optimizer's state is shaped like
    if cfg.lora.rank:  # optimizer state for the adapters only (lm/peft/lora.py)
        from lm.peft.lora import adapter_optimizer
        tx = adapter_optimizer(make_optimizer(cfg.optim, cfg.model, axes["adapters"], cfg.steps))
        inner_sh, inner_params = p_sh["adapters"], pure["adapters"]
    abstract_opt = jax.eval_shape(tx.init, pure)
    opt_sh = optim_state_shardings(abstract_opt, inner_params, inner_sh, replicated(mesh))
    state_sh = {"params": p_sh, "opt_state": opt_sh, "step": replicated(mesh),
                "rng": replicated(mesh)}
    shape = projection_shape(cfg.distill, cfg.model.d_model)
    if shape is not None:  # small: replicated
        abstract = jax.eval_shape(lambda: init_projection(shape, jax.random.PRNGKey(0)))
        state_sh["distill"] = jax.tree.map(lambda _: replicated(mesh), abstract)
    targets = {}
    if sparsity.enabled(cfg.sparsity):  # masks on their matrices' shardings
        targets = sparsity.target_paths(cfg.sparsity, pure, axes)
        state_sh["sparsity"] = {}
        for path in targets:
            set_path(state_sh["sparsity"], path, get_path(p_sh, path))
    return RunPieces(cfg, mesh, rules, graphdef, axes, tx, schedule(cfg.optim, cfg.steps),
                     state_sh, batch_sharding(mesh, rules, cfg.data.seq_len, cfg.batch_size),
                     sparse_targets=targets)
