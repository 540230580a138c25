"""The passkey retrieval task's text (Mohtashami & Jaggi 2023; LM-Infinite): a random
5-digit key hidden at some depth of repetitive filler, then a question whose answer is
the key. One home for the format, used by the synthetic training corpus
(data.corpus = "passkey", lm/data/sources.py) and the evaluation (lm/evals/passkey.py).

Lengths are in characters here; the byte tokenizer makes them tokens one for one.
"""

from __future__ import annotations

import numpy as np

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? The pass key is"
TRAIN_DOCS, VALIDATION_DOCS = 4000, 200


def needle(key: str) -> str:
    return f"The pass key is {key}. "


def answer(key: str) -> str:
    return f" {key}."


def random_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10_000, 100_000)))


def overhead(key: str = "00000") -> int:
    """Characters of a prompt and its answer that are not filler."""
    return len(needle(key)) + len(QUESTION) + len(answer(key))


def prompt(key: str, filler_chars: int, depth: float) -> str:
    """Filler of `filler_chars` characters with the needle at `depth` (0 = first, 1 =
    last, at a sentence boundary at or before that point), then the question."""
    filler = (FILLER * (filler_chars // len(FILLER) + 1))[:filler_chars]
    cut = round(min(max(depth, 0.0), 1.0) * filler_chars)
    if 0 < cut < filler_chars:
        cut = filler.rfind(". ", 0, cut) + 2 if ". " in filler[:cut] else 0
    return filler[:cut] + needle(key) + filler[cut:] + QUESTION


def score(predicted: str, key: str) -> bool:
    """Exact: the first run of digits in the model's continuation is the key (a longer or
    shorter number, or other digits, is wrong)."""
    digits, started = [], False
    for ch in predicted:
        if ch.isdigit():
            digits.append(ch)
            started = True
        elif started:
            break
    return "".join(digits) == key


def documents(split: str, max_chars: int, seed: int = 0) -> list[str]:
    """Training / validation texts: prompt + answer, filler lengths uniform up to what
    fits `max_chars` and depths uniform in [0, 1], deterministic by split and seed."""
    if max_chars < overhead():
        from lm.data.errors import DataError
        raise DataError(f"data.corpus=passkey needs data.seq_len >= {overhead() + 1} (the "
                        "needle, the question and the answer must fit one row)")
    n = TRAIN_DOCS if split == "train" else VALIDATION_DOCS
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    room = max(0, max_chars - overhead())
    out = []
    for _ in range(n):
        key = random_key(rng)
        filler = int(rng.integers(0, room + 1))
        out.append(prompt(key, filler, float(rng.random())) + answer(key))
    return out
