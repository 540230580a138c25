"""Trials batched into one program: K runs that share every shape train as one jitted,
vmapped step.

A study of small models is many tiny runs, and one tiny run uses a 2-core CPU (or a TPU
chip) badly: its matmuls are small and the host's per-step work is a large share of the
step. K trials that differ only in scalars (`traced_fields()`: learning rate, seed,
warmup, weight decay, z-loss coefficient, init scale, Adam's betas; and `data.seed`)
stack their parameters and optimizer states along a leading trial axis. Their scalars
are traced values of the step, not constants of its program: the train step of
lm/train/step.py and the optimizer of lm/optim run unchanged for one trial, built from
the trial's config with those fields replaced by tracers, under `jax.vmap`. So one
program, compiled once, trains every trial, each with its own LR schedule and, when
their data seeds differ, its own data order (one grain iterator per trial, batches
stacked); trials with one data seed read one stream.

Each trial keeps its own run directory, exactly as if it had run alone: config.json
(its own config), metrics.jsonl, TensorBoard scalars, summary.json and orbax
checkpoints of its slice of the state and of its data iterator. `lm results`, `lm
analyze`, `lm eval` and `lm sample` see no difference, and `lm train` on a trial's
directory resumes that trial alone from the group's checkpoint.

A group trains through the one driver of lm/train/driver.py, as a lone run does: the
same order of a step's life, signals, fault injection and failures (a full disk: exit 4,
the half-written checkpoints removed, every trial's summary.json saying so). A trial
whose step is non-finite is masked: from then on its state is the last finite one (the
step selects, per trial, the old or the new state), its status is "diverged at step N"
and it writes nothing more, while the others go on. A group resumes from the newest
checkpoint step all its trials have and restore: a trial's unreadable checkpoint is
renamed aside as a lone run's is (none intact: exit 2), and a step a trial has already
committed is kept, not written again.

On a mesh, the trial axis is the logical axis "trials" (lm/parallel/sharding.py;
default: the `data` mesh axis when K divides by it), so K trials spread over the chips of
a slice, each chip training K / data of them with the batch split over the other batch
axes. Training a group is single-process (`lm compile` compiles a group's step for any
topology: `compile_group_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import config as config_lib
from lm import schema
from lm.compress.distill import init_projection, projection_shape
from lm.compress.teacher import with_teacher_width
from lm.post.pairs import pair_eval_batches, pair_iterator
from lm.post.reference import attach_frozen
from lm.config import ConfigError, TrainConfig
from lm.data import Prefetcher, eval_batches, prefetch_depth, train_iterator
from lm.lock import hold
from lm.model import count_params, flops_per_token, logit_layers
from lm import optim as optim_lib
from lm.optim import make_optimizer, schedule
from lm.peft import make_model
from lm.train import trackers
from lm.train.checkpoint import Checkpointer
from lm.train.driver import Job, drive, open_run
from lm.train.loop import evaluate
from lm.train.mfu import device_peak_flops
from lm.train.setup import check_resumable, setup_run, with_vocab
from lm.train.state import memory_estimate
from lm.train.step import make_eval_step, make_preference_eval_step, make_train_step


def traced_fields() -> tuple[str, ...]:
    """Fields that may differ between the trials of a group and enter the step as traced
    scalars (role "traced", declared on the fields; int ones as int32). The code behind
    them must not branch on their values in Python (lm/optim, lm/model and
    lm/train/step.py do not)."""
    return config_lib.keys_with_role("traced")


def int_fields() -> set[str]:
    """The traced fields declared int."""
    return {k for k, e in schema.walk(TrainConfig) if "traced" in e.roles and e.hint is int}


def batchable_fields() -> tuple[str, ...]:
    """What may differ within a group: the traced fields, and those read on the host
    (role "per_trial": the data order, one iterator per distinct value; the name)."""
    return (*traced_fields(), *config_lib.keys_with_role("per_trial"))


def get_field(cfg: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), cfg)


def replace_field(cfg: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return schema.replace(cfg, **{head: value})
    return schema.replace(cfg, **{head: replace_field(getattr(cfg, head), rest, value)})


def _has_field(cfg: Any, path: str) -> bool:
    try:
        get_field(cfg, path)
    except AttributeError:
        return False
    return True


def group_key(cfg: TrainConfig) -> str:
    """Configs with equal keys can train as one batched group: equal up to the
    batchable fields (which are reset to their defaults here)."""
    default = TrainConfig()
    for path in batchable_fields():
        if _has_field(cfg, path):
            cfg = replace_field(cfg, path, get_field(default, path))
    return config_lib.to_json(cfg)


def unbatchable(cfg: TrainConfig) -> str | None:
    """Why a config cannot train in a batched group ("" / None: it can)."""
    if cfg.lora.rank:
        return "lora (the adapter optimizer is not batched yet)"
    if cfg.evals.tasks:
        return "evals.tasks (the harness scores one run's parameters at a time)"
    if cfg.data.sources:
        return "data.sources (a mixture's per-source evaluation runs one run at a time)"
    if cfg.sparsity.mode != "off":
        return "sparsity (the masks are not batched yet)"
    return None


def group_configs(cfgs: list[TrainConfig], limit: int) -> list[list[int]]:
    """Indices of `cfgs` in groups of at most `limit` that share a group key, in order
    of first appearance (so the groups are deterministic); a config that cannot be
    batched (`unbatchable`) is a group of its own."""
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(f"alone:{i}" if unbatchable(cfg) else group_key(cfg), []).append(i)
    return [idx[j:j + limit] for idx in by_key.values() for j in range(0, len(idx), limit)]


def _traced_values(cfgs: list[TrainConfig]) -> dict[str, np.ndarray]:
    """The traced fields that exist in these configs, stacked over the trials."""
    ints = int_fields()
    return {path: np.asarray([get_field(c, path) for c in cfgs],
                             np.int32 if path in ints else np.float32)
            for path in traced_fields() if _has_field(cfgs[0], path)}


def _with_values(cfg: TrainConfig, values: dict) -> TrainConfig:
    for path, v in values.items():
        cfg = replace_field(cfg, path, v)
    return cfg


def trial_axes(mesh, rules: dict, k: int) -> tuple[str, ...]:
    """Mesh axes of the trial dimension: the "trials" rule's axes, as far as K divides
    by their product (outermost first)."""
    axes, ways = [], 1
    for a in rules.get("trials", ()):
        n = mesh.shape.get(a, 1)
        if n > 1 and k % (ways * n) == 0:
            axes.append(a)
            ways *= n
    return tuple(axes)


def _prepend(sharding: NamedSharding, axes: tuple[str, ...]) -> NamedSharding:
    """The sharding of a stack of arrays sharded like `sharding`, stacked on axis 0."""
    inner = tuple(None if s is None else
                  (tuple(a for a in (s if isinstance(s, tuple) else (s,)) if a not in axes)
                   or None) for s in sharding.spec)
    return NamedSharding(sharding.mesh, P(axes or None, *inner))


class _StackedIterator(grain.DatasetIterator):
    """One grain iterator per trial; yields their batches stacked on a leading axis."""

    def __init__(self, sources: list):
        super().__init__()
        self._sources = sources

    def __next__(self):
        items = [next(s) for s in self._sources]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    def get_state(self) -> dict:
        return {"trials": [s.get_state() for s in self._sources]}

    def set_state(self, state: dict) -> None:
        for s, st in zip(self._sources, state["trials"]):
            s.set_state(st)


class _TrialData:
    """What a trial's checkpoint holds of the group's data stream: its own iterator's
    position (a grain checkpoint item: get_state/set_state as JSON bytes)."""

    def __init__(self, batches: Prefetcher, index: int | None):
        self.batches, self.index, self.restored = batches, index, None

    def get_state(self) -> bytes:
        state = self.batches.get_state()
        return json.dumps(state if self.index is None else state["trials"][self.index]).encode()

    def set_state(self, state: bytes) -> None:
        self.restored = json.loads(state)

    def start_prefetch(self) -> None:  # grain's restore calls it; the group starts its own
        pass


@dataclasses.dataclass
class Group:
    """K trials as one program (see the module docstring)."""
    cfgs: list[TrainConfig]
    run_dirs: list[Path]
    setup: Any  # RunSetup of the first trial's config with the group's rules
    shared_data: bool
    axes: tuple[str, ...]  # mesh axes of the trial dimension
    values: dict  # traced field -> [K] array

    @property
    def k(self) -> int:
        return len(self.cfgs)

    @property
    def pieces(self):
        return self.setup.pieces

    # ------------------------------------------------------------------ shardings

    def state_shardings(self) -> dict:
        stacked = jax.tree.map(lambda s: _prepend(s, self.axes), self.pieces.state_shardings)
        return {"trials": stacked, "alive": self._trial_sharding()}

    def _trial_sharding(self) -> NamedSharding:
        return NamedSharding(self.pieces.mesh, P(self.axes or None))

    def batch_sharding(self) -> NamedSharding:
        single = self.pieces.batch_sharding
        return single if self.shared_data else _prepend(single, self.axes)

    def values_sharding(self) -> dict:
        return {p: self._trial_sharding() for p in self.values}

    # ------------------------------------------------------------------ programs

    def _one(self, values: dict):
        """A trial's (config, optimizer, LR schedule) with its traced values."""
        cfg = _with_values(self.setup.cfg, values)
        return (cfg, make_optimizer(cfg.optim, cfg.model, self.pieces.axes, cfg.steps),
                schedule(cfg.optim, cfg.steps))

    def _vmap(self, fn, in_axes):
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=self.axes or None)

    def init_fn(self, start_params: bool = False):
        """values -> the group's first state from each trial's seed; with start_params,
        (values, params) -> every trial starting from those params (init_from's weights,
        one copy in: lm/train/param_source.py), each with its own optimizer state."""
        def init_one(values, params=None):
            cfg, tx, _ = self._one(values)
            if params is None:
                # nnx.Rngs(params=int) is jax.random.key(int); a traced seed must be a key.
                model = make_model(cfg, nnx.Rngs(params=jax.random.key(cfg.seed)))
                params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            state = {"params": params, "opt_state": tx.init(params),
                     "step": jnp.zeros([], jnp.int32), "rng": jax.random.PRNGKey(cfg.seed + 1)}
            # (a Python decision: the group's config, not the trial's traced weight)
            shape = projection_shape(self.setup.cfg.distill, cfg.model.d_model)
            if shape is not None:  # the hidden-state loss's projection
                state["distill"] = init_projection(shape, jax.random.PRNGKey(cfg.seed + 2))
            return state

        def init(values, params=None):
            return {"trials": self._vmap(init_one, (0, None))(values, params),
                    "alive": jnp.ones([self.k], bool)}
        in_shardings = (self.values_sharding(),)
        if start_params:
            in_shardings += (self.pieces.state_shardings["params"],)
        return jax.jit(self.pieces.traced_with_mesh(init), in_shardings=in_shardings,
                       out_shardings=self.state_shardings())

    def step_fn(self):
        """(group state, values, batch) -> (group state, metrics stacked over trials)."""
        pieces = self.pieces

        teacher = pieces.teacher  # one frozen teacher shared by every trial (not vmapped)

        def step_one(values, state, batch, teacher_params):
            # distill.weight / temperature, preference.beta / ...: traced
            cfg, tx, lr_fn = self._one(values)
            objective = pieces.objective(cfg)  # (a DPO reference is the shared frozen model)
            distill = None if teacher is None or objective is not None else (
                teacher.pieces.graphdef, cfg.distill, teacher.plan)
            step = make_train_step(pieces.graphdef, tx, lr_fn, cfg.optim.z_loss,
                                   cfg.grad_accum, pieces.loss_chunk, cfg.model, distill,
                                   objective=objective)
            return step(state, batch, teacher_params)

        def step(group, values, batch, teacher_params=None):
            new, metrics = self._vmap(step_one, (0, 0, None if self.shared_data else 0, None))(
                values, group["trials"], batch, teacher_params)
            keep = group["alive"] & metrics["finite"]
            trials = jax.tree.map(
                lambda n, o: jnp.where(keep.reshape(-1, *[1] * (n.ndim - 1)), n, o),
                new, group["trials"])
            return {"trials": trials, "alive": keep}, metrics

        in_shardings = (self.state_shardings(), self.values_sharding(), self.batch_sharding())
        if teacher is not None:
            in_shardings += (teacher.param_shardings,)
        return jax.jit(self.pieces.traced_with_mesh(step), in_shardings=in_shardings,
                       out_shardings=(self.state_shardings(), NamedSharding(pieces.mesh, P())),
                       donate_argnums=0)

    def eval_fn(self):
        pieces = self.pieces
        in_shardings = (self.state_shardings()["trials"]["params"], pieces.batch_sharding)
        if pieces.cfg.objective == "lm":
            single = make_eval_step(pieces.graphdef, pieces.loss_chunk)
            return jax.jit(pieces.traced_with_mesh(self._vmap(single, (0, None))),
                           in_shardings=in_shardings)

        def one(values, params, batch, *frozen):  # the trial's traced coefficients
            cfg = _with_values(self.setup.cfg, values)
            fn = make_preference_eval_step(pieces.graphdef, pieces.objective(cfg),
                                           pieces.loss_chunk)
            return fn(params, batch, *frozen)
        in_shardings = (self.values_sharding(), *in_shardings)
        if pieces.teacher is not None:  # the shared DPO reference
            in_shardings += (pieces.teacher.param_shardings,)
        axes = (0, 0, None) + ((None,) if pieces.teacher is not None else ())
        return jax.jit(pieces.traced_with_mesh(self._vmap(one, axes)),
                       in_shardings=in_shardings)

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(self.init_fn(), self.abstract_values())
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings())

    def abstract_values(self) -> dict:
        return {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._trial_sharding())
                for p, v in self.values.items()}

    def abstract_batch(self) -> dict:
        single = self.pieces.abstract_batch()
        lead = () if self.shared_data else (self.k,)
        return {n: jax.ShapeDtypeStruct(lead + s.shape, s.dtype, sharding=self.batch_sharding())
                for n, s in single.items()}

    def compile_step(self):
        """The AOT-compiled group step and its per-device memory (bytes)."""
        args = (self.abstract_state(), self.abstract_values(), self.abstract_batch())
        if self.pieces.teacher is not None:
            args += (self.pieces.teacher.abstract_params(),)
        compiled = self.step_fn().lower(*args).compile()
        return compiled, memory_estimate(compiled)


def make_group(cfgs: list[TrainConfig], run_dirs: list[Path] | None = None,
               mesh=None) -> Group:
    """Validate that `cfgs` can train as one group and build its pieces."""
    if not cfgs:
        raise ConfigError("a trial group needs at least one trial")
    keys = {group_key(c) for c in cfgs}
    if len(keys) > 1:
        fields = sorted({d.split(":")[0] for c in cfgs[1:]
                         for d in config_lib.config_diff(cfgs[0], c)} - set(batchable_fields()))
        raise ConfigError(f"trials of one group may differ only in {', '.join(batchable_fields())}; "
                          f"these differ in {', '.join(fields[:4])}")
    if jax.process_count() > 1:
        raise ConfigError("batched trials train in one process (run a pod job per trial)")
    if (why := unbatchable(cfgs[0])) is not None:
        raise ConfigError(f"batched trials do not support {why}: train it alone (--batch 1)")
    cfgs = [with_teacher_width(c) for c in cfgs]  # (the projection's shape, if any)
    for key in ("hidden_weight", "relation_weight"):
        if len({getattr(c.distill, key) > 0 for c in cfgs}) > 1:
            raise ConfigError(f"trials of one group may differ in distill.{key}, but all > 0 "
                              "or all 0 (whether that loss is computed is one program's "
                              "decision)")
    k = len(cfgs)
    first = cfgs[0]
    rules_text = first.mesh.rules
    probe = setup_run(first, mesh)  # validates, fills the vocabulary, builds the mesh
    t_axes = trial_axes(probe.pieces.mesh, probe.pieces.rules, k)
    if t_axes:  # the batch inside a trial leaves the trial axes to the trials
        batch = "+".join(a for a in probe.pieces.rules["batch"] if a not in t_axes)
        rules_text = ",".join(filter(None, [rules_text, f"batch={batch}"]))
        mesh_cfg = dataclasses.replace(first.mesh, rules=rules_text)
        probe = setup_run(dataclasses.replace(first, mesh=mesh_cfg), probe.pieces.mesh)
    # A distillation teacher or a DPO reference: checked before any run dir exists; one
    # frozen model for the group.
    attach_frozen(probe)
    # Each trial's own config (its config.json), validated, with the vocabulary filled.
    cfgs = [config_lib.validate(with_vocab(c, probe.tokenizer.vocab_size)) for c in cfgs]
    shared = len({c.data_seed for c in cfgs}) == 1
    return Group(cfgs, [Path(d) for d in (run_dirs or [])], probe, shared, t_axes,
                 _traced_values(cfgs))


# ---------------------------------------------------------------------- training


def _slice(tree, k: int):
    return jax.tree.map(lambda x: x[k], tree)


def train_group(cfgs: list[TrainConfig], run_dirs: list[str | Path], mesh=None) -> list[int]:
    """Train (or resume) K trials as one program; returns each trial's exit code (0
    done, 3 diverged, 128 + signal when stopped after a checkpoint). Raises DiskFull
    (exit 4) when a write finds no space, ConfigError (exit 2) when a trial has no
    intact checkpoint left."""
    from contextlib import ExitStack

    group = make_group(cfgs, [Path(d) for d in run_dirs], mesh)
    cfgs, dirs, k = group.cfgs, group.run_dirs, group.k
    if len(dirs) != k or len(set(dirs)) != k:
        raise ConfigError("a trial group needs one distinct run directory per trial")
    first, tokenizer = group.setup.cfg, group.setup.tokenizer
    trackers.check(first)  # before any run dir exists
    seeds = sorted({c.data_seed for c in cfgs})
    if first.objective != "lm":  # preference pairs (lm/post/pairs.py)
        sources = [pair_iterator(first.data, tokenizer, first.batch_size, s,
                                 read_threads=first.data.read_threads) for s in seeds]
    else:
        sources = [train_iterator(first.data, tokenizer, first.batch_size, s,
                                  read_threads=first.data.read_threads) for s in seeds]
    if group.shared_data:
        source, index = sources[0], [None] * k
    else:
        by_seed = dict(zip(seeds, sources))
        source = _StackedIterator([by_seed[c.data_seed] for c in cfgs])
        index = list(range(k))
    b_sh = group.batch_sharding()
    batches = Prefetcher(source, lambda b: {n: jax.device_put(v, b_sh) for n, v in b.items()},
                         prefetch_depth(first.data.prefetch, jax.devices()[0].platform))
    eval_data = (eval_batches if first.objective == "lm" else pair_eval_batches)(
        first.data, tokenizer, first.batch_size, first.eval_batches)
    with ExitStack() as held:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            held.enter_context(hold(d, "lm train (batched trials)"))
        for c, d in zip(cfgs, dirs):
            check_resumable(c, d)
            (d / "config.json").write_text(config_lib.to_json(c))
        return _train(group, batches, index, eval_data)


def _restore(group: Group, ckpts: list[Checkpointer], batches: Prefetcher, index: list):
    """(start step, group state) from the newest step every trial has committed and
    restores, or (0, None). A trial's checkpoint that does not restore is renamed aside
    and the group tries an older common step, as a lone run does (lm/train/checkpoint.py);
    none intact is a ConfigError."""
    common = set.intersection(*(set(c.committed_steps()) for c in ckpts))
    abstract = group.pieces.abstract_state()
    if not common:
        newer = [c.directory for c in ckpts if c.committed_steps()]
        if newer:
            print(f"warning: the trials share no checkpoint step ({len(newer)} of {len(ckpts)} "
                  "have one): the group starts from step 0", flush=True)
        return 0, None
    got: list = [None] * group.k  # per trial: (step, state, its data position)
    limit = max(common)
    while True:
        for i, c in enumerate(ckpts):
            if got[i] is not None and got[i][0] == limit:
                continue
            view = _TrialData(batches, index[i])
            step, state = c.restore_newest_intact(
                lambda step, c=c, view=view: c.restore(step, abstract, view), rename=True,
                steps=[s for s in common if s <= limit])
            got[i] = (step, state, view)
        low = min(g[0] for g in got)
        if all(g[0] == low for g in got):
            break
        limit = low  # a trial's newer ones did not restore: all go back to its step
    step = got[0][0]
    views = [g[2] for g in got]
    batches.set_state(views[0].restored if index[0] is None
                      else {"trials": [v.restored for v in views]})
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                           *(g[1] for g in got))
    trials = jax.device_put(stacked, group.state_shardings()["trials"])
    alive = jax.device_put(np.ones([group.k], bool), group.state_shardings()["alive"])
    return step, {"trials": trials, "alive": alive}


def _train(group: Group, batches: Prefetcher, index: list, eval_data: list) -> list[int]:
    cfgs, dirs, k, pieces = group.cfgs, group.run_dirs, group.k, group.pieces
    first, tokenizer = group.setup.cfg, group.setup.tokenizer
    names = [c.name for c in cfgs]
    ckpts = [Checkpointer(d / "checkpoints", c.checkpoint_every, c.keep_checkpoints)
             for c, d in zip(cfgs, dirs)]
    start, state = _restore(group, ckpts, batches, index)
    values = jax.device_put(group.values, group.values_sharding())
    if state is None and first.init_from:  # every trial from the same weights
        from lm.train.param_source import initial_state
        state = group.init_fn(start_params=True)(values, initial_state(pieces)["params"])
    elif state is None:
        state = group.init_fn()(values)
    else:
        print(f"resumed {k} trials from step {start}", flush=True)
    batches.start_prefetch()

    # One model shape, sequence length and optimizer for the group (group_key): once.
    counts, fpt = count_params(first.model), flops_per_token(first.model, first.data.seq_len)
    teacher, teacher_params, extra = pieces.teacher, None, {}
    if teacher is not None:  # restored once, pinned in every trial's run dir
        teacher_params = teacher.load(dirs[0])
        for d in dirs[1:]:
            teacher.pin(d)
        extra["teacher_flops_per_token"] = teacher.forward_flops_per_token()
        extra["distill_flops_per_token"] = teacher.step_flops_per_token(first.model)
        fpt += extra["distill_flops_per_token"]
        print(f"{teacher.describe()}, shared by the {k} trials", flush=True)
    _, optim_bytes = optim_lib.describe(first.optim, first.model, pieces.abstract_state())
    runs = [open_run(d, c, start, counts, fpt, ckpt, label=f"trial {c.name}: ",
                     batched_with=names, optimizer_state_bytes_per_param=optim_bytes, **extra)
            for c, d, ckpt in zip(cfgs, dirs, ckpts)]
    print(f"{k} trials batched as one program ({'one shared' if group.shared_data else 'own'} "
          f"data order{'s' if not group.shared_data else ''}; trial axis on "
          f"{'+'.join(group.axes) or 'no mesh axis'}): {', '.join(names)}", flush=True)
    t0 = time.perf_counter()
    step_fn, memory = group.compile_step()
    if memory.get("temp") is not None:
        print(f"compiled the group step in {time.perf_counter() - t0:.1f}s; per device: "
              f"arguments {memory['argument'] / 2**20:.1f} MiB, temporaries "
              f"{memory['temp'] / 2**20:.1f} MiB", flush=True)
    eval_fn = group.eval_fn()
    layers = logit_layers(first.model)

    frozen = () if teacher_params is None else (teacher_params,)

    def evaluate_trials(state) -> list[dict]:
        if first.objective != "lm":
            from lm.train.loop import evaluate_preference
            out = evaluate_preference(pieces, functools.partial(eval_fn, values),
                                      state["trials"]["params"], eval_data, frozen)
            return [{k: (float(np.asarray(v)[i]) if np.ndim(v) else v)
                     for k, v in out.items()} for i in range(k)]
        per_trial = evaluate(pieces, eval_fn, state["trials"]["params"], eval_data, tokenizer)
        return [{"loss": float(per_trial["loss"][i]), "bpb": float(per_trial["bpb"][i])}
                for i in range(k)]

    def record(metrics: dict, step: int) -> dict:
        return dict(metrics, attn_logit_max={j: metrics["attn_logit_max"][j] for j in layers})

    job = Job(cfg=first, runs=runs, batches=batches, state=state, start=start,
              step=(lambda s, batch: step_fn(s, values, batch)) if teacher is None else
                   (lambda s, batch: step_fn(s, values, batch, teacher_params)),
              evaluate=evaluate_trials,
              # Each trial's checkpoint: its slice of the state, its data position.
              checkpoint=lambda s, i: (_slice(s["trials"], i), _TrialData(batches, index[i])),
              tokens_per_step=first.batch_size * first.data.seq_len, flops_per_token=fpt,
              peak_flops=device_peak_flops()[0],
              per_run=lambda tree: [_slice(tree, i) for i in range(k)],
              record=record, batched=True,
              evaluate_first=bool(first.init_from) and start == 0)
    return drive(job)
