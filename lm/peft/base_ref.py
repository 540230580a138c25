"""The frozen base of a LoRA run: left out of its checkpoints, named by a reference.

A LoRA run's base never changes, so re-saving it at every checkpoint only costs disk and
time. Its checkpoints hold the train state without params["base"] (adapters, optimizer
state, step, RNG, data iterator), and the run dir holds `lora_base.json`, written once
at the first start (before the first checkpoint), saying where the base comes from:

    {"kind": "init", "seed": S}         no init_from: the seed's deterministic init,
                                         recomputed (the run's own init_state, bit for bit)
    {"kind": "run", "path": P, "step": N}  init_from an lmlab run: checkpoint step N of it,
                                         the one the base was restored from (not the
                                         newest: the source may train on)
    {"kind": "hf", "path": P, "files": [...]}  init_from a Hugging Face dir, with a cheap
                                         fingerprint of each *.safetensors file (name,
                                         bytes, sha256 of its header and of 16 sampled
                                         64 KiB blocks): a copy matches, a different
                                         fine-tune of the same architecture does not

One file per run rather than a copy in every checkpoint: the base is the run's for its
whole life, like config.json (which a checkpoint needs as well to be read back).

Everything that restores a run goes through the Checkpointer's `Layout` (this module):
resume (lm/train/loop.py), restore_for_inference (lm eval / sample / export) and init_from
a LoRA source (lm/train/init_from.py). A base that is gone or changed is a ConfigError,
one line naming it, raised before the checkpoint is read: never taken for a damaged
checkpoint (those are renamed aside on resume), so the run's checkpoints stay as they are.
Checkpoints written before this change hold the base; they are recognised by their tree
metadata and restore whole, and such a run (no lora_base.json) keeps saving whole states.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax

from lm.errors import ConfigError

REF_FILE = "lora_base.json"
_SAMPLES, _BLOCK = 16, 64 * 1024


def without_base(state: dict) -> dict:
    """The state (or abstract state) a LoRA checkpoint holds: all but params["base"]."""
    return {**state, "params": {k: v for k, v in state["params"].items() if k != "base"}}


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


def load_base(pieces, ref: dict | None = None) -> tuple[dict, dict]:
    """(reference, base params on pieces' shardings). ref None: the first start, the base
    that the config names (init_from or the seed), pinned; otherwise exactly the base that
    `ref` names, checked to be unchanged (ConfigError, one line, if it is not there)."""
    from lm.train.init_from import _run_params, source_kind
    cfg = pieces.cfg
    pinning = ref is None
    if pinning:
        if not cfg.init_from:
            ref = {"kind": "init", "seed": cfg.seed}
        else:
            path = Path(cfg.init_from).absolute()
            ref = {"kind": source_kind(str(path)), "path": str(path)}
            if ref["kind"] == "hf":
                ref["files"] = fingerprint(path)
    kind = ref.get("kind")
    if kind == "init":
        if ref.get("seed") != cfg.seed:
            raise ConfigError(f"it is the init of seed {ref.get('seed')}, the run's config says "
                              f"seed={cfg.seed}")
        return ref, pieces.init_state()["params"]["base"]
    path = Path(ref.get("path", ""))
    if kind == "hf":
        from lm.interop.hf_import import load_params
        if not pinning:
            if not path.is_dir():
                raise ConfigError(f"the Hugging Face dir {path} is gone")
            now = {f["name"]: f for f in fingerprint(path)}
            for f in ref.get("files", []):
                if now.get(f["name"]) != f:
                    what = "is gone" if f["name"] not in now else "changed since the run started"
                    raise ConfigError(f"{path / f['name']} {what}")
            if set(now) - {f["name"] for f in ref.get("files", [])}:
                raise ConfigError(f"{path} holds safetensors files it did not hold when the "
                                  "run started")
        return ref, load_params(path, cfg, pieces, prefix=("base",))
    if kind == "run":
        if not (path / "config.json").is_file():
            raise ConfigError(f"the run {path} is gone (no config.json there)")
        step, base = _run_params(path, pieces, None if pinning else ref["step"])
        return {**ref, "step": step}, base
    raise ConfigError(f"unknown kind of base {kind!r}")


def initial_state(pieces) -> tuple[dict, dict]:
    """(reference, train state) of a LoRA run's first start: the base the config names,
    the adapters of the run's own init, a fresh optimizer."""
    if not pieces.cfg.init_from:  # the base and the adapters are the seed's init
        return {"kind": "init", "seed": pieces.cfg.seed}, pieces.init_state()
    from lm.interop.hf_import import fresh_state
    ref, base = load_base(pieces)
    adapters = jax.jit(lambda: pieces._init()["params"]["adapters"],
                       out_shardings=pieces.state_shardings["params"]["adapters"])()
    return ref, fresh_state(pieces, {"base": base, "adapters": adapters})


def restore_step(ckpt, step: int, read, source: Path):
    """(step, read(step)) of one pinned checkpoint of `source`, or ConfigError."""
    from lm.train.checkpoint import _reason
    if step not in ckpt.committed_steps():
        raise ConfigError(f"checkpoint step {step} of {source} is gone (keep_checkpoints "
                          "may have removed it)")
    try:
        return step, read(step)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (unreadable: one line)
        raise ConfigError(f"checkpoint step {step} of {source} is unreadable "
                          f"({_reason(e)})") from None


class Layout:
    """What a LoRA run's checkpoints hold (lm/train/checkpoint.py Checkpointer(layout=))."""

    def __init__(self, run_dir: Path, pieces):
        self.run_dir, self.pieces = Path(run_dir).absolute(), pieces
        self.path = self.run_dir / REF_FILE
        self.ref = None  # None: a first start to come, or a run from before this change
        if self.path.is_file():
            try:
                self.ref = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{self.path} is damaged ({e})") from None
        self._base = None

    def start(self) -> dict:
        """The first start's state; its base's reference is written to lora_base.json."""
        self.ref, state = initial_state(self.pieces)
        if jax.process_index() == 0:  # one writer per run dir; atomic
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ref, indent=2))
            os.replace(tmp, self.path)
        return state

    def saved(self, state: dict) -> dict:
        """What a checkpoint holds: the state without the base once its reference is on
        disk (a run from before this change goes on saving whole states)."""
        return state if self.ref is None else without_base(state)

    def reading(self, step_dir: Path, abstract_state: dict):
        """(abstract state of what `step_dir` holds, restored -> full state)."""
        import orbax.checkpoint as ocp
        from etils import epath
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
        if "base" in stored["params"]:  # written before this change: the whole state
            return abstract_state, lambda state: state
        base = self.base()  # before the read: a missing base is not a damaged checkpoint
        return without_base(abstract_state), lambda state: {
            **state, "params": {**state["params"], "base": base}}

    def base(self) -> dict:
        """The base, rebuilt once from the reference (ConfigError, one line, naming what
        is missing). Valid until the state holding it is donated to a train step."""
        if self._base is None:
            where = f"the LoRA base of {self.run_dir} ({self.path.name})"
            if self.ref is None:
                raise ConfigError(f"{self.path} is missing: the checkpoints in {self.run_dir} hold "
                                  "only the LoRA adapters, and it names their base")
            try:
                _, self._base = load_base(self.pieces, self.ref)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            except Exception as e:  # noqa: BLE001 (never a damaged checkpoint of this run)
                from lm.train.checkpoint import _reason
                raise ConfigError(f"{where} could not be loaded: {_reason(e)}") from None
        return self._base


def checkpoint_layout(run_dir: Path, pieces) -> Layout | None:
    """The Checkpointer layout of a run: a LoRA run's, or None (the whole state)."""
    return Layout(run_dir, pieces) if pieces.cfg.lora.rank else None


def run_checkpointer(run_dir: Path, pieces):
    """The Checkpointer of the run in `run_dir` (built from `pieces`), with its layout:
    every reader and writer of a run's checkpoints gets one here, so none can forget
    that a LoRA run's leave out the base."""
    from lm.train.checkpoint import Checkpointer
    cfg = pieces.cfg
    return Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint_every,
                        cfg.keep_checkpoints, layout=checkpoint_layout(Path(run_dir), pieces))
