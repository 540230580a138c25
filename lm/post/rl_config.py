"""The `rl` config section of `lm rl` (GRPO with verifiable rewards, lm/post/grpo.py).

This module imports nothing of lmlab beyond the schema and errors: lm.config imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm.errors import ConfigError
from lm.schema import knob

TASKS = ("addition", "sort", "reverse")


@dataclass(frozen=True)
class RLConfig:
    """Reinforcement learning with verifiable rewards: GRPO (`lm rl`, lm/post/grpo.py)."""
    task: Literal["addition", "sort", "reverse"] = knob(
        "addition", doc="The synthetic task whose prompts are drawn (by seed and step): "
                        "addition (\"12+34=\" -> \"46\"), sort (\"sort:3142=\" -> \"1234\"), "
                        "reverse (\"reverse:abc=\" -> \"cba\") (lm/post/rl_tasks.py).")
    size: int = knob(1, doc="The task's size: digits per addend (addition), digits in the "
                            "list (sort), letters in the word (reverse).")
    reward: str = knob(
        "exact", doc="How a completion is scored: exact = 1 when its text up to the first "
                     "newline, stripped, is the answer, else 0; regex:PATTERN = 1 when "
                     "PATTERN ({answer} stands for the escaped answer) matches the "
                     "completion (re.search); FILE.py:FN = FN(prompt, completion) -> float.")
    skip_bad_rewards: bool = knob(
        False, doc="A reward function that raises or returns a non-number: false = one "
                   "line naming the prompt, exit 2; true = that sample gets reward 0 and "
                   "is counted (metrics bad_rewards).")
    prompts: int = knob(8, doc="P: prompts per RL step.")
    group: int = knob(8, doc="G: samples per prompt (the group the advantage is "
                             "normalised over).")
    temperature: float = knob(1.0, doc="Sampling temperature of the rollouts (> 0).")
    max_new_tokens: int = knob(8, doc="Longest completion, in tokens.")
    clip_eps: float = knob(0.2, doc="ε of the clipped ratio: -min(ρA, clip(ρ, 1-ε, "
                                    "1+ε)A) per completion token.")
    kl_weight: float = knob(
        0.0, doc="Weight of the k3 KL estimate to the reference (the frozen initial "
                 "policy); 0 = none (DAPO-style; the reference is then never computed).")
    loss_mean: Literal["token", "sequence"] = knob(
        "token", doc="token = mean over every completion token of the batch (DAPO); "
                     "sequence = mean over completions of each one's token mean (GRPO "
                     "as in Shao et al. 2024).")
    updates_per_batch: int = knob(1, doc="μ: optimizer steps per rollout batch (ρ = π / "
                                         "π_old moves away from 1 after the first).")
    lag: int = knob(0, doc="k: the sampling policy lags the learner by k steps (the "
                           "rollouts of step s come from the params after step s-1-k); "
                           "the ratio is against the sampling policy. Holds k copies of "
                           "the params.")


def validate(rl: RLConfig) -> None:
    for key in ("size", "prompts", "group", "max_new_tokens", "updates_per_batch"):
        if getattr(rl, key) < 1:
            raise ConfigError(f"rl.{key} must be >= 1, got {getattr(rl, key)}")
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature must be > 0 (rollouts sample), got {rl.temperature}")
    if not 0 < rl.clip_eps < 1:
        raise ConfigError(f"rl.clip_eps must be in (0, 1), got {rl.clip_eps}")
    if rl.kl_weight < 0:
        raise ConfigError(f"rl.kl_weight must be >= 0, got {rl.kl_weight}")
    if rl.lag < 0:
        raise ConfigError(f"rl.lag must be >= 0, got {rl.lag}")
    if not rl.reward:
        raise ConfigError("rl.reward must be exact, regex:PATTERN or FILE.py:FN")
