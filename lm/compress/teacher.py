"""The frozen teacher of a distilling run (`distill.teacher`, `lm train --distill-from`).

`teacher_for(setup)` reads the teacher's config (an lmlab run's config.json, or a Hugging
Face directory's config and tokenizer.json: lm/train/param_source.py, as `--init-from`
does) and checks it against the student before anything is written: the path must hold
a run or an HF model, and its tokenizer and vocabulary must be the student's (KD
compares next-token distributions position by position); each failure is a ConfigError,
one line, exit 2. It builds the teacher's pieces on the student's mesh with the same
logical-axis rules, so its parameters are sharded as a model of its shape would be.

`Teacher.load(run_dir)` restores its parameters (frozen: no optimizer state, not part of
the run's train state or checkpoints). The source is pinned at the run's first start in
RUN/distill_teacher.json (a run teacher's checkpoint step, an HF directory's
fingerprint, as lora_base.json pins a LoRA base), and every restart (a resume) restores
that same teacher: a teacher run that trained on, or an HF directory that changed, does
not silently change the objective of the resumed run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lm import config as config_lib
from lm.compress.distill import (DistillConfig, Plan, hidden, layer_pairs, relation_pair,
                                 relations)
from lm.config import ConfigError, TrainConfig
from lm.data import DataError, load_tokenizer
from lm.model import ModelConfig, flops_per_token, mixers
from lm.peft.lora import LoRAConfig
from lm.train.param_source import HFDirectory, RunCheckpoint, from_init_from, from_json
from lm.train.setup import RunSetup
from lm.train.state import RunPieces, build

PIN_FILE = "distill_teacher.json"
# A frozen model's role -> (its pin file, the config key that names it). "reference":
# a DPO run's frozen initial policy (lm/post/reference.py).
ROLES = {"teacher": (PIN_FILE, "distill.teacher"),
         "reference": ("dpo_reference.json", "init_from")}
_PROBE = "The quick brown fox, 0123456789 -- ¿qué? 日本語\n"


@dataclass
class Teacher:
    cfg: TrainConfig  # the teacher's model and tokenizer, on the student's mesh and batch
    pieces: RunPieces
    source: RunCheckpoint | HFDirectory
    plan: Plan = Plan()  # the layers the hidden-state and relation losses compare
    role: str = "teacher"  # a key of ROLES

    @property
    def pin_file(self) -> str:
        return ROLES[self.role][0]

    @property
    def param_shardings(self) -> dict:
        return self.pieces.state_shardings["params"]

    def abstract_params(self) -> dict:
        return self.pieces.abstract_state()["params"]

    def forward_flops_per_token(self) -> float:
        """The teacher's forward FLOPs per token: a third of its training FLOPs (the 6N
        convention's forward share, attention included)."""
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len) / 3

    def step_flops_per_token(self, student: ModelConfig) -> float:
        """All the FLOPs per token distillation adds to a `student` step: the teacher's
        forward; the learned projection of the hidden-state loss where the widths
        differ (2 d_s d_t per pair forward, x3 with its backward); the relation scores
        (MiniLM: Q-Q, K-K and V-V products over the causally visible keys, (T + 1) / 2
        on average, 2 W FLOPs per key for a width W: the student's forward and
        backward, x3, the teacher's forward). Softmaxes and KLs are not counted, as
        attention's are not."""
        flops = self.forward_flops_per_token()
        s_width, t_width = student.d_model, self.cfg.model.d_model
        if self.plan.hidden and s_width != t_width:
            flops += 6 * s_width * t_width * len(self.plan.hidden)
        if self.plan.relation is not None:
            visible = (self.cfg.data.seq_len + 1) / 2
            def qkv(m):
                return m.n_heads * m.dh + 2 * m.kv_heads * m.dh
            flops += 2 * visible * (3 * qkv(student) + qkv(self.cfg.model))
        return flops

    def describe(self) -> str:
        if self.role == "reference":
            return f"reference (frozen initial policy): {self.source.describe()}"
        return (f"distilling from {self.source.describe()} ({self.cfg.model.d_model} wide, "
                f"{self.cfg.model.n_layers} layers)")

    def load(self, run_dir: Path | None = None) -> dict:
        """The teacher's params on their shardings (and `source` pinned). With `run_dir`:
        the source pinned in RUN/distill_teacher.json (written at the first start, read
        on every resume)."""
        pin = None if run_dir is None else Path(run_dir) / self.pin_file
        source = self.source
        if pin is not None and pin.is_file():
            try:
                source = from_json(json.loads(pin.read_text()))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{pin} is damaged ({e})") from None
        where = f"{ROLES[self.role][1]}={self.source.path}"
        try:
            pinned, params = (source.restore(self.pieces, quiet=True)
                              if isinstance(source, RunCheckpoint) else source.restore(self.pieces))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        self.source = pinned
        if run_dir is not None:
            self.pin(run_dir)
        return params

    def pin(self, run_dir: Path) -> None:
        """Write the (pinned) source to RUN/<pin_file>, unless it is there."""
        pin = Path(run_dir) / self.pin_file
        if pin.is_file() or jax.process_index() != 0:
            return
        tmp = pin.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.source.to_json(), indent=2))
        os.replace(tmp, pin)


def _source(path: str) -> RunCheckpoint | HFDirectory:
    try:
        return from_init_from(str(Path(path).absolute()))
    except ConfigError as e:
        raise ConfigError(str(e).replace("init_from=", "distill.teacher=", 1)) from None


def teacher_config(student: TrainConfig, source: RunCheckpoint | HFDirectory) -> TrainConfig:
    """The teacher's config: its model (and tokenizer), with the student's mesh, batch
    and sequence length; no LoRA (a LoRA teacher's adapters are merged on restore), no
    distillation, no init_from."""
    where = f"distill.teacher={source.path}"
    if isinstance(source, RunCheckpoint):
        base = config_lib.load_run_config(source.path / "config.json")
    else:
        try:
            model, tok = source.model_config()
        except ConfigError as e:
            raise ConfigError(str(e).replace("init_from=", "distill.teacher=", 1)) from None
        base = dataclasses.replace(student, model=model,
                                   data=dataclasses.replace(student.data, tokenizer=tok))
    if student.data.seq_len > base.model.max_seq_len:
        raise ConfigError(f"{where}: data.seq_len={student.data.seq_len} is longer than the "
                          f"teacher's model.max_seq_len={base.model.max_seq_len}")
    cfg = dataclasses.replace(
        base, mesh=student.mesh, batch_size=student.batch_size, grad_accum=1,
        data=dataclasses.replace(base.data, seq_len=student.data.seq_len),
        lora=LoRAConfig(), distill=DistillConfig(), init_from="")
    try:
        return config_lib.validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def same_tokenizer(a, b) -> bool:
    """Two tokenizers that give the same ids for the same text and name the same bytes."""
    if a.spec == b.spec:
        return True
    return (a.vocab_size == b.vocab_size
            and (a.bos_id, a.eos_id, a.pad_id) == (b.bos_id, b.eos_id, b.pad_id)
            and np.array_equal(np.asarray(a.token_bytes), np.asarray(b.token_bytes))
            and np.array_equal(a.encode(_PROBE), b.encode(_PROBE)))


def teacher_for(setup: RunSetup) -> Teacher:
    """The teacher of setup's config (distill.teacher), checked and built; no weights
    read yet (see the module doc)."""
    student = setup.cfg
    source = _source(student.distill.teacher)
    where = f"distill.teacher={source.path}"
    cfg = teacher_config(student, source)
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except DataError as e:
        raise ConfigError(f"{where}: its tokenizer: {e}") from None
    t_vocab, s_vocab = cfg.model.vocab_size or tok.vocab_size, student.model.vocab_size
    if not same_tokenizer(tok, setup.tokenizer) or t_vocab != s_vocab:
        raise ConfigError(
            f"{where}: the teacher's vocabulary ({t_vocab} logits, tokenizer "
            f"{cfg.data.tokenizer}) is not the student's ({s_vocab} logits, tokenizer "
            f"{student.data.tokenizer}); distillation needs one tokenizer")
    pairs, relation = (), None
    if relations(student.distill):
        relation = relation_plan(student, cfg)
    if hidden(student.distill):
        pairs = layer_pairs(student.distill, student.model.n_layers, cfg.model.n_layers)
        t_width, s_width = cfg.model.d_model, student.model.d_model
        if t_width != s_width and student.distill.teacher_width != t_width:
            raise ConfigError(f"distill.teacher_width={student.distill.teacher_width} is not "
                              f"the teacher's d_model ({t_width}): leave it 0 (filled when "
                              "training starts)")
    pieces = build(cfg, setup.pieces.mesh)
    pieces.target_platform = setup.pieces.target_platform
    return Teacher(cfg, pieces, source, Plan(pairs, relation))


def relation_plan(student: TrainConfig, teacher: TrainConfig) -> tuple[int, int, int]:
    """(student layer, teacher layer, relation heads) of the relation loss, checked: both
    layers attention, the models not layer-scanned, R dividing every Q/K/V width."""
    d = student.distill
    s, t = relation_pair(d, student.model.n_layers, teacher.model.n_layers)
    heads = d.relation_heads or teacher.model.n_heads
    widths = []
    for who, m, layer in (("student", student.model, s), ("teacher", teacher.model, t)):
        if m.scan_layers:
            raise ConfigError(f"distill.relation_weight > 0 needs the {who}'s "
                              "model.scan_layers=false")
        if not hasattr(mixers.sequence_mixer(m, layer), "projections"):
            raise ConfigError(f"distill.relation_layers: the {who}'s layer {layer} is not an "
                              f"attention layer ({mixers.sequence_mixer(m, layer).name})")
        widths += [m.n_heads * m.dh, m.kv_heads * m.dh]
    if any(w % heads for w in widths):
        raise ConfigError(f"distill.relation_heads={heads} must divide the Q/K/V widths of "
                          f"both models ({', '.join(map(str, sorted(set(widths))))})")
    return s, t, heads


def with_teacher_width(cfg: TrainConfig) -> TrainConfig:
    """cfg with distill.teacher_width filled from the teacher's config when the
    hidden-state loss is on (the learned projection's shape); unchanged otherwise. The
    teacher's weights are not read."""
    if not hidden(cfg.distill) or cfg.distill.teacher_width:
        return cfg
    source = _source(cfg.distill.teacher)
    width = teacher_config(cfg, source).model.d_model
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill,
                                                                teacher_width=width))


__all__ = ["Teacher", "teacher_for", "teacher_config", "with_teacher_width", "relation_plan",
           "same_tokenizer", "PIN_FILE"]
