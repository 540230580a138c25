"""Synthetic tasks with verifiable answers, drawn by seed, and the reward functions that
score a completion (`rl.task`, `rl.size`, `rl.reward`; lm/post/rl_config.py).

A task gives `Problem`s (a prompt text and its answer): addition ("12+34=" -> "46"),
sorting a short list of digits ("sort:3142=" -> "1234"), reversing a word
("reverse:abc=" -> "cba"). Problem i of RL step s is drawn from a generator seeded by
(seed, s): the rollouts of a step are the same in every run with that seed, and a resumed
run draws what the uninterrupted one drew.

A reward function is `fn(prompt: str, completion: str) -> float`, the completion being
the sampled text after the prompt (stop token excluded). Built in: `exact` (1 when the
completion up to its first newline, stripped, is the answer) and `regex:PATTERN` (1 when
PATTERN, with `{answer}` standing for the escaped answer, is found in the completion);
`FILE.py:FN` loads a user function. `sft_records` writes prompt/response records of a
task for `lm train` (data.format=instruction): the warm start that teaches the format.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.errors import ConfigError


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def _addition(rng: np.random.Generator, size: int) -> Problem:
    a, b = (int(x) for x in rng.integers(0, 10 ** size, 2))
    return Problem(f"{a}+{b}=", str(a + b))


def _sort(rng: np.random.Generator, size: int) -> Problem:
    digits = "".join(str(int(d)) for d in rng.integers(0, 10, size))
    return Problem(f"sort:{digits}=", "".join(sorted(digits)))


def _reverse(rng: np.random.Generator, size: int) -> Problem:
    word = "".join(rng.choice(list(string.ascii_lowercase), size))
    return Problem(f"reverse:{word}=", word[::-1])


TASKS: dict[str, Callable[[np.random.Generator, int], Problem]] = {
    "addition": _addition, "sort": _sort, "reverse": _reverse}


def problems(task: str, size: int, seed: int, step: int, n: int) -> list[Problem]:
    """The n problems of RL step `step` (0-based; -1: the SFT records' stream) of a run
    with `seed`."""
    rng = np.random.default_rng([seed, step + 1, 0x5EED])
    return [TASKS[task](rng, size) for _ in range(n)]


def completion_answer(completion: str) -> str:
    """What the exact checker compares: the text up to the first newline, stripped."""
    return completion.split("\n", 1)[0].strip()


def exact_reward(problem: Problem, completion: str) -> float:
    return float(completion_answer(completion) == problem.answer)


def regex_reward(pattern: str) -> Callable[[Problem, str], float]:
    try:
        re.compile(pattern.replace("{answer}", "0"))
    except re.error as e:
        raise ConfigError(f"rl.reward=regex:{pattern}: not a regular expression ({e})") from None

    def reward(problem: Problem, completion: str) -> float:
        return float(re.search(pattern.replace("{answer}", re.escape(problem.answer)),
                               completion) is not None)
    return reward


def user_reward(spec: str) -> Callable[[Problem, str], float]:
    """FILE.py:FN -> a reward of (problem, completion) calling FN(prompt, completion)."""
    from lm.config import exec_python_file
    path, _, name = spec.rpartition(":")
    module = exec_python_file(path, "reward file")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec}: {path} defines no function {name!r}")
    return lambda problem, completion: fn(problem.prompt, completion)


def reward_function(spec: str) -> Callable[[Problem, str], float]:
    """The reward function `rl.reward` names (ConfigError, one line, when it cannot be)."""
    if spec == "exact":
        return exact_reward
    if spec.startswith("regex:"):
        return regex_reward(spec[len("regex:"):])
    if ".py:" in spec:
        return user_reward(spec)
    raise ConfigError(f"rl.reward={spec!r}: expected exact, regex:PATTERN or FILE.py:FN")


class RewardError(ConfigError):
    """A reward function raised or returned a non-number (names the prompt)."""


def score(reward: Callable[[Problem, str], float], problem: Problem, completion: str) -> float:
    """reward(problem, completion) as a finite float; RewardError (one line naming the
    prompt) when it raises or returns something else."""
    try:
        value = float(reward(problem, completion))
    except Exception as e:  # noqa: BLE001 (the user's function: any failure is theirs)
        raise RewardError(f"the reward function failed on prompt {problem.prompt!r} "
                          f"(completion {completion!r}): {type(e).__name__}: {e}") from None
    if not math.isfinite(value):
        raise RewardError(f"the reward function returned {value} on prompt "
                          f"{problem.prompt!r} (completion {completion!r})")
    return value


def sft_records(task: str, size: int, n: int, seed: int) -> list[dict]:
    """n prompt/response records of the task (data.format=instruction), drawn from a
    stream of their own (seed, -1): not the RL steps' problems."""
    return [{"prompt": p.prompt, "response": p.answer}
            for p in problems(task, size, seed, -1, n)]


def write_sft_jsonl(path: str | Path, task: str, size: int, n: int, seed: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_records(task, size, n, seed)))
    return path
