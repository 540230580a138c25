"""Passkey retrieval (`lm eval --task passkey`): accuracy by prompt length x key depth.

Each trial hides a random key (lm/data/passkey.py) at a depth of filler sized so that
the tokenizer's frame prefix (e.g. [BOS]) + prompt + answer is exactly length + 1
tokens: one row of `length` inputs. The scorer is exact: a trial is right iff greedy
decoding continues the prompt with the answer. That is read from one teacher-forced
forward pass: greedy decoding reproduces the answer iff, at each answer position, the
argmax given the answer's previous tokens is the answer's token (the first wrong token
ends the agreement either way). The predicted tokens are decoded and checked by
`passkey.score` (the key's digits, exactly).
Deterministic: the keys depend only on (seed, length, depth index, trial).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ConfigError
from lm.data import passkey
from lm.evals.lengths import rows_per_batch
from lm.evals.overrides import eval_time_pieces


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths: expected comma-separated fractions, got {text!r}") from None
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ConfigError(f"--depths: expected fractions in [0, 1], got {text!r}")
    return depths


def _fit(tokenizer, key: str, length: int, depth: float) -> tuple[list[int], list[int]]:
    """(prompt ids, the tokenizer's frame prefix first (BOS for the byte tokenizer),
    answer ids), len(prompt) + len(answer) == length + 1
    (filler grown or shrunk a character at a time for tokenizers that are not bytes)."""
    ans = list(tokenizer.encode(passkey.answer(key)))
    chars = max(0, length - len(ans) - passkey.overhead(key) + len(passkey.answer(key)))
    for _ in range(4 * length):
        ids = list(tokenizer.frame_prefix) + list(tokenizer.encode(
            passkey.prompt(key, chars, depth)))
        extra = len(ids) + len(ans) - (length + 1)
        if extra == 0:
            return ids, ans
        if extra > 0 and chars == 0:
            break
        chars = max(0, chars - extra)
        if extra < 0 and chars == 0:
            chars = 1
    raise ConfigError(f"--lengths: cannot build a passkey prompt of exactly {length} tokens "
                      "with this tokenizer (too short for the needle and the question?)")


def make_trials(tokenizer, length: int, depths: list[float], n: int, seed: int) -> list[dict]:
    """Rows for every (depth, trial): inputs/targets of `length` tokens, where the answer
    sits (the last len(answer) targets) and the key."""
    rows = []
    for di, depth in enumerate(depths):
        rng = np.random.default_rng([seed, length, di])
        for _ in range(n):
            key = passkey.random_key(rng)
            ids, ans = _fit(tokenizer, key, length, depth)
            seq = np.asarray(ids + ans, np.int32)
            rows.append({"depth": depth, "key": key, "answer": ans,
                         "inputs": seq[:-1], "targets": seq[1:]})
    return rows


def _argmax_fn(graphdef, tail: int):
    """The greedy next tokens at the last `tail` positions (only those are scored: the
    readout of every position would be [rows, length, vocab] floats at long lengths)."""
    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        x, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
        return jnp.argmax(model.readout(x[:, -tail:]), axis=-1).astype(jnp.int32)
    return fn


def run_passkey(run, params, lengths: list[int], depths: list[float], overrides: list[str],
                *, trials: int = 20, seed: int = 0) -> dict:
    """{"lengths", "depths", "accuracy" [len][depth], "cells": [{length, depth, accuracy,
    correct, trials}]} for a restored run."""
    n = trials
    mesh, tok = run.pieces.mesh, run.tokenizer
    acc, cells = [], []
    for length in lengths:
        pieces = eval_time_pieces(run, overrides, length)
        rows = make_trials(tok, length, depths, n, seed)
        tail = max(len(r["answer"]) for r in rows)
        fn = pieces.params_batch_fn("passkey_argmax", _argmax_fn(pieces.graphdef, tail))
        bs = rows_per_batch(run.cfg.batch_size * run.cfg.data.seq_len, length, mesh.size)
        right = {d: 0 for d in depths}
        for s in range(0, len(rows), bs):
            chunk = rows[s:s + bs]
            pad = bs - len(chunk)
            inputs = np.stack([r["inputs"] for r in chunk] + [chunk[0]["inputs"]] * pad)
            batch = {"inputs": inputs, "targets": inputs,
                     "positions": np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape).copy(),
                     "segment_ids": np.ones_like(inputs),
                     "loss_mask": np.ones(inputs.shape, np.float32)}
            pred = np.asarray(fn(params, pieces.replicated_batch(batch)))
            for r, p in zip(chunk, pred):
                k = len(r["answer"])
                right[r["depth"]] += passkey.score(tok.decode(p[-k:].tolist()), r["key"])
        acc.append([right[d] / n for d in depths])
        cells += [{"length": length, "depth": d, "accuracy": right[d] / n, "correct": right[d],
                   "trials": n} for d in depths]
    return {"lengths": lengths, "depths": depths, "accuracy": acc, "cells": cells,
            "overrides": overrides, "seed": seed}


def plot_heatmap(report: dict, path, title: str = ""):
    """Accuracy heat map: prompt length (rows) x key depth (columns), PNG."""

    from lm.analysis.scaling import _pyplot, save_figure
    plt = _pyplot()
    a = np.asarray(report["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * a.shape[1], 1.2 + 0.6 * a.shape[0]))
    im = ax.imshow(a, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center",
                    color="w" if a[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(a.shape[1]), [f"{d:g}" for d in report["depths"]])
    ax.set_yticks(range(a.shape[0]), [str(n) for n in report["lengths"]])
    ax.set(xlabel="key depth", ylabel="prompt length (tokens)",
           title=title or "passkey accuracy " + " ".join(report.get("overrides", [])))
    fig.colorbar(im, ax=ax)
    return save_figure(fig, plt, path)
