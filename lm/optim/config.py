"""The optimizer's config section (`optim`): the shared chain's knobs (clip, weight decay,
LR schedule) and one declared section per built-in update direction (optim.adamw, ...);
a plug-in direction's section is added by its registration (lm/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm.optim.adafactor import AdafactorConfig
from lm.optim.adamw import AdamWConfig
from lm.optim.lion import LionConfig
from lm.optim.muon import MuonConfig
from lm.optim.sgd_sai import SGDSaIConfig
from lm.schema import Composed, knob, section


@dataclass(frozen=True)
class OptimConfig(Composed):
    """The shared optimizer chain's knobs (clip, weight decay, LR schedule); `name` picks
    the update direction, whose own knobs are its section (optim.adamw, ...: see
    lm/optim)."""
    section_group = "optim"

    name: str = knob("adamw", doc="The update direction: adamw, lion, adafactor, muon, "
                                  "sgd_sai, or a registered plug-in.")
    lr: float = knob(3e-3, roles={"traced"}, doc="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = knob(
        "cosine", doc="LR after the warmup: cosine | linear | constant to min_lr_ratio x lr, "
                      "or wsd (warmup-stable-decay: constant, then a linear decay).")
    warmup_steps: int = knob(100, roles={"traced"}, doc="Linear warmup steps.")
    decay_fraction: float = knob(0.2, doc="wsd: fraction of steps in the final decay.")
    min_lr_ratio: float = knob(0.1, roles={"traced"}, doc="The final LR as a fraction of lr.")
    weight_decay: float = knob(0.1, roles={"traced"}, doc="Decoupled weight decay, on "
                                                          "matrices only.")
    independent_weight_decay: bool = knob(
        False, doc="True: decay by weight_decay * schedule(t)/lr, i.e. not multiplied by the "
                   "peak LR (Wortsman et al. 2023); False: AdamW's decay lr(t) * weight_decay.")
    clip_norm: float = knob(1.0, doc="Global gradient-norm clipping; 0 = off.")
    z_loss: float = knob(0.0, roles={"traced"}, doc="Coefficient of the mean "
                                                    "logsumexp(logits)^2 auxiliary loss.")

    adamw: AdamWConfig = section(AdamWConfig)
    lion: LionConfig = section(LionConfig)
    adafactor: AdafactorConfig = section(AdafactorConfig)
    muon: MuonConfig = section(MuonConfig)
    sgd_sai: SGDSaIConfig = section(SGDSaIConfig)
