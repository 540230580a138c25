"""The frozen reference of a DPO run: the initial policy (`init_from`), built as
distillation builds its teacher (lm/compress/teacher.py `Teacher`, role "reference"):
on the policy's own pieces (same model, mesh and shardings), its params restored once per
start and passed to the step as an argument of their own (never differentiated, no
optimizer state, not in checkpoints), the source pinned at the first start in
RUN/dpo_reference.json so a resumed run compares against the same weights even if the
source run trained on. A LoRA run needs none: its frozen base is the reference
(lm/train/step.py objective_sums)."""

from __future__ import annotations

from lm.compress.teacher import Teacher
from lm.post.preference import needs_reference
from lm.train.param_source import from_init_from
from lm.train.setup import RunSetup


def reference_for(setup: RunSetup) -> Teacher | None:
    """The frozen reference of setup's run (no weights read yet), or None where the
    objective needs none or a LoRA base serves."""
    cfg = setup.cfg
    if not needs_reference(cfg.objective) or cfg.lora.rank:
        return None
    return Teacher(cfg, setup.pieces, from_init_from(cfg.init_from), role="reference")


def attach_frozen(setup: RunSetup) -> None:
    """Attach the run's frozen model (a distillation teacher or a DPO reference) to its
    pieces, checked before anything is written; idempotent."""
    if setup.pieces.teacher is not None:
        return
    if setup.cfg.distill.teacher:
        from lm.compress.teacher import teacher_for
        setup.pieces.teacher = teacher_for(setup)
    else:
        setup.pieces.teacher = reference_for(setup)
