"""Where a run's first weights come from: a ParamSource, one of

    SeedInit(seed)              the deterministic init of a seed (the run's own init)
    RunCheckpoint(path, step)   checkpoint `step` of an lmlab run; step None: its newest
                                intact one, pinned when restored (the source may train on)
    HFDirectory(path, files)    a Hugging Face model directory; `files`: a fingerprint of
                                its *.safetensors (name, bytes, sha256 of the header and of
                                16 sampled 64 KiB blocks), None until pinned: a copy
                                matches, another fine-tune of the same architecture not

`lm train --init-from SOURCE` (config field `init_from`, `from_init_from`) names a run
or an HF directory; without it a run starts from its seed's init. Each source can

    describe()          say in one line what it is
    model_config()      give the model section (and tokenizer) a run started from it takes
    check()             say it is still there and unchanged (ConfigError, one line)
    restore(pieces)     give (itself pinned, its params as pieces' model holds them, on
                        pieces' shardings): tied or untied into pieces' recursion
                        (lm/model/recursive.py), a LoRA source's adapters merged, a LoRA
                        run's frozen base
    to_json()           the form `from_json` reads back (lora_base.json)

`--init-from` (`with_source_model`, `initial_state`): the model section is the source's
(the weights fix it), with the `--set model.*` overrides of the command on top (e.g.
remat, compute dtype); the tokenizer is the source's unless the command sets
`data.tokenizer`; the optimizer state starts fresh and the step counter at 0. The source
is read only when the run dir holds no checkpoint: a rerun resumes the fine-tune from its
own checkpoints, never the base again.

A LoRA run's frozen base never changes, so its checkpoints leave it out (adapters,
optimizer state, step, RNG, data iterator) and the run dir holds `lora_base.json`, written
once at the first start before the first checkpoint: the base's source, pinned, as
`to_json` writes it ({"kind": "init", "seed": S} | {"kind": "run", "path": P, "step": N}
| {"kind": "hf", "path": P, "files": [...]}). Every reader and writer of a run's
checkpoints gets them from `run_checkpointer` (resume, restore_for_inference for lm eval /
sample / export, a RunCheckpoint source), so none forgets that. A base that is gone or
changed is a ConfigError, one line naming it, raised before the checkpoint is read: never
taken for a damaged checkpoint (those are renamed aside on resume). Checkpoints written
before lora_base.json existed hold the base; they are recognised by their tree metadata
and restore whole, and such a run (no lora_base.json) goes on saving whole states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import jax

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.compress.sparsity import effective_params
from lm.interop.families import model_config_from_hf
from lm.interop.hf_import import load_params, read_hf_config
from lm.model import recursive
from lm.peft.lora import merged_params
from lm.train.checkpoint import Checkpointer, failure_reason
from lm.train.setup import RunSetup, setup_run
from lm.train.state import RunPieces, build
from lm.tree import get_path

REF_FILE = "lora_base.json"  # a LoRA run's base: its source, pinned (to_json)
_SAMPLES, _BLOCK = 16, 64 * 1024


@dataclass(frozen=True)
class SeedInit:
    """The init of `seed`: recomputed, bit for bit the run's own init_state."""
    seed: int
    kind: ClassVar[str] = "init"

    def describe(self) -> str:
        return f"the init of seed {self.seed}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "seed": self.seed}

    def check(self) -> None:
        pass  # nothing to lose: a seed is always there

    def restore(self, pieces: RunPieces) -> tuple[SeedInit, dict]:
        if self.seed != pieces.cfg.seed:
            raise ConfigError(f"it is the init of seed {self.seed}, the run's config says "
                              f"seed={pieces.cfg.seed}")
        params = pieces.init_state()["params"]
        return self, params["base"] if pieces.cfg.lora.rank else params


@dataclass(frozen=True)
class RunCheckpoint:
    """Checkpoint `step` of the lmlab run in `path` (None: its newest intact one)."""
    path: Path
    step: int | None = None
    kind: ClassVar[str] = "run"

    def describe(self) -> str:
        if self.step is None:
            return f"the newest intact checkpoint of {self.path}"
        return f"checkpoint step {self.step} of {self.path}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "step": self.step}

    def model_config(self) -> tuple[config_lib.ModelConfig, str]:
        cfg = config_lib.load_run_config(self.path / "config.json")
        return cfg.model, cfg.data.tokenizer

    def check(self) -> None:
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"the run {self.path} is gone (no config.json there)")
        if self.step is not None and not (self.path / "checkpoints" / str(self.step)).is_dir():
            raise ConfigError(f"{self.describe()} is gone (keep_checkpoints may have removed it)")

    def restore(self, pieces: RunPieces, quiet: bool = False) -> tuple[RunCheckpoint, dict]:
        """Restored onto pieces' mesh; a first start (step None) says which step (unless
        `quiet`: the caller says it, e.g. a distilling run of its teacher)."""
        self.check()
        src_cfg = config_lib.load_run_config(self.path / "config.json")
        src_model, model = src_cfg.model, pieces.cfg.model
        if src_model.recursion != model.recursion:  # tying / untying layers: the parents
            src_model, model = recursive.untied(src_model), recursive.untied(model)
        if src_model != model:
            diff = [d for d in config_lib.config_diff(
                        dataclasses.replace(src_cfg, model=src_model),
                        dataclasses.replace(src_cfg, model=model)) if d.startswith("model.")]
            free = set(config_lib.keys_with_role("free_init"))  # (declared on the fields)
            structural = [d for d in diff if d.split(":")[0] not in free]
            if structural:
                raise ConfigError(f"init_from={self.path}: the model differs from the "
                                  f"source's ({'; '.join(structural[:3])})")
        # The source's own train state (its optimizer's shape), laid out on this mesh.
        src_pieces = build(dataclasses.replace(src_cfg, mesh=pieces.cfg.mesh), pieces.mesh)
        restored = _read_params(self.path, src_pieces, self.step)
        if restored is None:
            raise ConfigError(f"init_from={self.path}: the run has no checkpoint yet")
        step, params = restored
        if self.step is None and not quiet:  # a fine-tune's first start (a pinned step: a LoRA base)
            print(f"initialised from {self.path} (checkpoint step {step})", flush=True)
        if src_cfg.lora.rank:  # a LoRA source: its adapters folded into its base
            params = jax.jit(lambda p: merged_params(src_cfg.model, src_cfg.lora, p))(params)
        return (dataclasses.replace(self, step=step),
                _converted(params, src_cfg.model, pieces))


@dataclass(frozen=True)
class HFDirectory:
    """A Hugging Face model directory; `files` its fingerprint (None: not pinned yet)."""
    path: Path
    files: tuple[dict, ...] | None = None
    kind: ClassVar[str] = "hf"

    def describe(self) -> str:
        return f"the Hugging Face dir {self.path}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "files": list(self.files or ())}

    def model_config(self) -> tuple[config_lib.ModelConfig, str]:
        tok = self.path / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"init_from={self.path}: the Hugging Face directory has no "
                              "tokenizer.json")
        return model_config_from_hf(read_hf_config(self.path)), str(tok)

    def check(self) -> None:
        """Its safetensors files as the fingerprint found them (unpinned: nothing to compare)."""
        if self.files is None:
            return
        if not self.path.is_dir():
            raise ConfigError(f"{self.describe()} is gone")
        now = {f["name"]: f for f in fingerprint(self.path)}
        for f in self.files:
            if now.get(f["name"]) != f:
                what = "is gone" if f["name"] not in now else "changed since the run started"
                raise ConfigError(f"{self.path / f['name']} {what}")
        if set(now) - {f["name"] for f in self.files}:
            raise ConfigError(f"{self.path} holds safetensors files it did not hold when the "
                              "run started")

    def restore(self, pieces: RunPieces) -> tuple[HFDirectory, dict]:
        self.check()
        pinned = self if self.files is not None else dataclasses.replace(
            self, files=tuple(fingerprint(self.path)))
        if not recursive.enabled(pieces.cfg.model):
            return pinned, load_params(self.path, pieces.cfg, pieces, prefix=_model_prefix(pieces))
        # A Hugging Face model is untied: load it as the parent, then tie its layers.
        cfg = pieces.cfg
        parent = build(dataclasses.replace(cfg, model=recursive.untied(cfg.model)), pieces.mesh)
        params = load_params(self.path, parent.cfg, parent, prefix=_model_prefix(parent))
        return pinned, _converted(params, parent.cfg.model, pieces)


ParamSource = Union[SeedInit, RunCheckpoint, HFDirectory]
_KINDS = {c.kind: c for c in (SeedInit, RunCheckpoint, HFDirectory)}


def from_json(ref: dict) -> ParamSource:
    """The source `to_json` wrote (lora_base.json), or ConfigError."""
    kind = ref.get("kind") if isinstance(ref, dict) else None
    if kind not in _KINDS:
        raise ConfigError(f"unknown kind of base {kind!r}")
    if kind == "init":
        return SeedInit(ref.get("seed"))
    path = Path(ref.get("path", ""))
    if kind == "run":
        return RunCheckpoint(path, ref["step"])
    return HFDirectory(path, tuple(ref.get("files", [])))


def from_init_from(source: str) -> RunCheckpoint | HFDirectory:
    """The source `init_from` names: an lmlab run dir or a Hugging Face model dir (told
    apart by its config.json), or ConfigError."""
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ConfigError(f"init_from={source}: no config.json there (neither an lmlab run "
                          "nor a Hugging Face model directory)")
    try:
        head = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={source}: config.json is not readable JSON ({e})") from None
    if isinstance(head, dict) and "model_type" in head:
        return HFDirectory(path.absolute())
    return RunCheckpoint(path.absolute())


def config_source(cfg: TrainConfig) -> ParamSource:
    """Where the run of `cfg` starts from: cfg.init_from, or its seed's init."""
    return from_init_from(cfg.init_from) if cfg.init_from else SeedInit(cfg.seed)


def fingerprint(hf_dir: Path) -> list[dict]:
    """Per *.safetensors file: name, size, and a hash of its header (tensor names, dtypes,
    shapes, offsets) and of blocks sampled evenly through it (~1 MiB read per file)."""
    out = []
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with f.open("rb") as fh:
            head = fh.read(8)
            h.update(head)
            h.update(fh.read(int.from_bytes(head, "little") if len(head) == 8 else 0))
            for i in range(_SAMPLES):
                fh.seek(max(0, (size - _BLOCK) * i // max(_SAMPLES - 1, 1)))
                h.update(fh.read(_BLOCK))
        out.append({"name": f.name, "bytes": size, "sample_sha256": h.hexdigest()})
    return out


def with_source_model(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """cfg with the model (and, unless overridden, the tokenizer) of cfg.init_from."""
    if not cfg.init_from:
        return cfg
    source = from_init_from(str(Path(cfg.init_from).absolute()))
    model, tokenizer = source.model_config()
    data = cfg.data
    if not any(o.strip().startswith("data.tokenizer=") for o in overrides):
        data = dataclasses.replace(data, tokenizer=tokenizer)
    out = dataclasses.replace(cfg, model=model, data=data, init_from=str(source.path))
    if isinstance(source, RunCheckpoint) and cfg.sparsity == type(cfg.sparsity)() and not any(
            o.strip().startswith("sparsity.") for o in overrides):
        # A sparse source's pattern and targets carry on (a pruned run heals with its
        # masks fixed); --set sparsity.mode=off trains it dense.
        src_sparsity = config_lib.load_run_config(source.path / "config.json").sparsity
        if src_sparsity.mode != "off":
            out = dataclasses.replace(out, sparsity=src_sparsity)
    out = config_lib.apply_overrides(out, [o for o in overrides if o.strip().startswith("model.")])
    return config_lib.validate(out)


def initial_state(pieces: RunPieces) -> dict:
    """The train state of a run's first start (see first_state)."""
    return _pinned_initial_state(pieces)[1]


def first_state(pieces: RunPieces, ckpt: Checkpointer) -> dict:
    """The train state of a run's first start (its run dir holds no checkpoint yet): the
    weights of the source its config names (init_from, or the seed's init), a LoRA run's
    adapters of its own init, a fresh optimizer state, step 0. A LoRA run's base is pinned
    in lora_base.json first, before any checkpoint leaves it out."""
    if isinstance(ckpt.layout, LoRABaseLayout):
        return ckpt.layout.start()
    return initial_state(pieces)


def _pinned_initial_state(pieces: RunPieces) -> tuple[ParamSource, dict]:
    source = config_source(pieces.cfg)
    if isinstance(source, SeedInit):  # the base and any adapters are the seed's init
        return source, pieces.init_state()
    pinned, params = source.restore(pieces)
    if pieces.cfg.lora.rank:
        params = {"base": params, "adapters": pieces.init_params("adapters")}
    return pinned, pieces.fresh_state(params)


def _model_prefix(pieces: RunPieces) -> tuple:
    """Where the model's params sit in the run's params (a LoRA run's: its base)."""
    return ("base",) if pieces.cfg.lora.rank else ()


def _converted(params: dict, source_model, pieces: RunPieces) -> dict:
    """Params of `source_model` as this run's model's, when the two differ in their
    recursion (lm/model/recursive.py: tied blocks averaged, relaxations by SVD)."""
    model = pieces.cfg.model
    if source_model.recursion == model.recursion:
        return params
    if recursive.enabled(model):
        print(f"recursion: the {model.n_layers} layers tied into {model.recursion.blocks} "
              f"block(s) ({model.recursion.order}; averaged), relaxation rank "
              f"{model.recursion.relax_rank} (SVD of each layer's residual)", flush=True)
    else:
        print(f"recursion: untied into {model.n_layers} layers", flush=True)
    shardings = get_path(pieces.state_shardings["params"], _model_prefix(pieces))
    return jax.jit(lambda p: recursive.convert(p, source_model, model, pieces.cfg.seed),
                   out_shardings=shardings)(params)


# --- a run's checkpoints: what they hold, and reading them back -----------------------

def without_base(state: dict) -> dict:
    """The state (or abstract state) a LoRA checkpoint holds: all but params["base"]."""
    return {**state, "params": {k: v for k, v in state["params"].items() if k != "base"}}


class LoRABaseLayout:
    """What a LoRA run's checkpoints hold (lm/train/checkpoint.py Checkpointer(layout=)):
    the state without its base, which lora_base.json names."""

    def __init__(self, run_dir: Path, pieces: RunPieces):
        self.run_dir, self.pieces = Path(run_dir).absolute(), pieces
        self.path = self.run_dir / REF_FILE
        self.ref = None  # None: a first start to come, or a run from before lora_base.json
        if self.path.is_file():
            try:
                self.ref = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{self.path} is damaged ({e})") from None
        self._base = None

    def start(self) -> dict:
        """The first start's state; its base's source, pinned, goes to lora_base.json."""
        source, state = _pinned_initial_state(self.pieces)
        self.ref = source.to_json()
        if jax.process_index() == 0:  # one writer per run dir; atomic
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ref, indent=2))
            os.replace(tmp, self.path)
        return state

    def saved(self, state: dict) -> dict:
        """What a checkpoint holds: the state without the base once its reference is on
        disk (a run from before lora_base.json goes on saving whole states)."""
        return state if self.ref is None else without_base(state)

    def reading(self, step_dir: Path, abstract_state: dict):
        """(abstract state of what `step_dir` holds, restored -> full state)."""
        import orbax.checkpoint as ocp
        from etils import epath
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
        if "base" in stored["params"]:  # written before lora_base.json: the whole state
            return abstract_state, lambda state: state
        base = self.base()  # before the read: a missing base is not a damaged checkpoint
        return without_base(abstract_state), lambda state: {
            **state, "params": {**state["params"], "base": base}}

    def base(self) -> dict:
        """The base, rebuilt once from its source (ConfigError, one line, naming what is
        missing). Valid until the state holding it is donated to a train step."""
        if self._base is None:
            where = f"the LoRA base of {self.run_dir} ({self.path.name})"
            if self.ref is None:
                raise ConfigError(f"{self.path} is missing: the checkpoints in {self.run_dir} hold "
                                  "only the LoRA adapters, and it names their base")
            try:
                _, self._base = from_json(self.ref).restore(self.pieces)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            except Exception as e:  # noqa: BLE001 (never a damaged checkpoint of this run)
                raise ConfigError(f"{where} could not be loaded: {failure_reason(e)}") from None
        return self._base


def checkpoint_layout(run_dir: Path, pieces: RunPieces) -> LoRABaseLayout | None:
    """The Checkpointer layout of a run: a LoRA run's, or None (the whole state)."""
    return LoRABaseLayout(run_dir, pieces) if pieces.cfg.lora.rank else None


def run_checkpointer(run_dir: Path, pieces: RunPieces) -> Checkpointer:
    """The Checkpointer of the run in `run_dir` (built from `pieces`), with its layout:
    every reader and writer of a run's checkpoints gets one here, so none can forget
    that a LoRA run's leave out the base."""
    cfg = pieces.cfg
    return Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint_every,
                        cfg.keep_checkpoints, layout=checkpoint_layout(Path(run_dir), pieces))


def _read_params(run_dir: Path, pieces: RunPieces, step: int | None) -> tuple[int, dict] | None:
    """(step, params) of checkpoint `step` of the run in run_dir (None: its newest intact
    one; None if it has none), as `pieces` lay them out. A reader does not own the run dir
    (a trainer may be writing it): an unreadable checkpoint is reported and skipped,
    never renamed; a pinned one that does not read is a ConfigError."""
    ckpt = run_checkpointer(run_dir, pieces)
    # The params as the model computes with them: a sparse run's masked (the one place
    # inference, export and --init-from read a run's weights; lm/compress/sparsity.py).
    read = lambda s: effective_params(ckpt.restore_params(s, pieces.abstract_state()))  # noqa: E731
    try:
        if step is None:
            return ckpt.restore_newest_intact(read, rename=False)
        try:
            return step, read(step)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 (unreadable: one line)
            raise ConfigError(f"checkpoint step {step} of {run_dir} is unreadable "
                              f"({failure_reason(e)})") from None
    finally:
        ckpt.close()


def restore_for_inference(run_dir: str | Path, lora_rank: int = 0,
                          step: int | None = None) -> tuple[RunSetup, Any, int]:
    """(setup, params, step) of checkpoint `step` (None: the latest) in a run dir, on the devices at
    hand: the training mesh may have had more, so the run's config gets the data-parallel
    mesh over these devices and orbax reshards the checkpoint onto it (a LoRA run's base
    rebuilt from lora_base.json). `lora_rank`: a LoRA run's adapters used up to this rank
    (lm/peft/lora.py eval_rank; 0 = all)."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"--run {run_dir}: no config.json there (not a run directory)")
    cfg = config_lib.load_run_config(run / "config.json")
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(rules=cfg.mesh.rules))
    if lora_rank:
        if not cfg.lora.rank:
            raise ConfigError(f"--lora-rank: {run_dir} is not a LoRA run")
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, eval_rank=lora_rank))
    setup = setup_run(cfg)
    if step is not None and not (run / "checkpoints" / str(step)).is_dir():
        have = sorted(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit())
        raise ConfigError(f"--step {step}: {run_dir} has no checkpoint at that step "
                          f"(it has {', '.join(map(str, have)) or 'none'})")
    restored = _read_params(run, setup.pieces, step)
    if restored is None:
        raise ConfigError(f"--run {run_dir}: no checkpoint yet")
    step, params = restored
    return setup, params, step
