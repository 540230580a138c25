"""Run setup, written once: config -> tokenizer -> vocabulary -> validated config ->
pieces (mesh checked against the devices, model graph, optimizer, shardings).

Every command that runs a model starts here: `lm train` (`train`), `lm bench`, and `lm
eval` / `lm sample` (lm/train/param_source.py `restore_for_inference`, from a run
directory). Everything in it that can fail on user input raises ConfigError / DataError
before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from jax.sharding import Mesh

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.data import Tokenizer, load_tokenizer
from lm.train.state import RunPieces, build


def operational_fields() -> set[str]:
    """Fields that may change between a run and its resumption (role "operational"): they
    steer bookkeeping, not the computation, so the resumed run still reproduces the
    uninterrupted one."""
    return set(config_lib.keys_with_role("operational")) | set(
        config_lib.keys_with_role("after_resume"))


def with_vocab(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """Fill model.vocab_size from the tokenizer (0 = unset)."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({vocab_size})")
    return cfg


@dataclass
class RunSetup:
    cfg: TrainConfig  # validated, vocabulary filled
    tokenizer: Tokenizer
    pieces: RunPieces
    compiled: tuple | None = field(default=None, repr=False)  # see compiled_train_step

    def compiled_train_step(self):
        """(AOT-compiled train step, its per-device memory estimate), compiled once per
        setup (lm bench runs the loop several times on one)."""
        if self.compiled is None:
            self.compiled = self.pieces.compile_train_step()
        return self.compiled


def setup_run(cfg: TrainConfig, mesh: Mesh | None = None) -> RunSetup:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = config_lib.validate(with_vocab(cfg, tokenizer.vocab_size))
    return RunSetup(cfg, tokenizer, build(cfg, mesh))  # build checks mesh and shapes


def check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """A run dir that holds a run must hold this run (up to operational_fields())."""
    saved = Path(run_dir) / "config.json"
    if not saved.exists():
        return
    previous = config_lib.load_run_config(saved)
    operational = operational_fields()
    diff = [d for d in config_lib.config_diff(previous, cfg)
            if d.split(":")[0] not in operational]
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different config "
                          f"({'; '.join(diff[:3])}); use another --run-dir")
