"""Loss by sequence length and by position (`lm eval --lengths 256,1024,4096`): how a
model trained at one length does on longer validation rows, with any eval-time attention
variant (a window with sinks = LM-Infinite's Λ mask) or RoPE scaling (lm/evals/overrides).

Rows are the validation split packed at each length (documents longer than the row are
cut into row-long pieces whose positions start at 0), so position p of a row is RoPE
position p of its document for every full row. The curve is the mean loss over the
tokens at each position, in bins."""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError
from lm.data import eval_batches
from lm.evals.overrides import eval_time_pieces
from lm.train.step import token_losses

CURVE_BINS = 64


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths: expected comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"--lengths: expected lengths >= 2, got {text!r}")
    return lengths


def _per_position(graphdef, loss_chunk):
    def fn(params, batch):
        nll = token_losses(graphdef, params, batch, loss_chunk)[0]
        mask = batch["loss_mask"]
        return jnp.sum(nll * mask, axis=0), jnp.sum(mask, axis=0)
    return fn


def rows_per_batch(tokens: int, length: int, ways: int) -> int:
    """About `tokens` per batch, at least one row per batch shard."""
    rows = max(1, tokens // length)
    return -(-rows // ways) * ways


def loss_by_length(run, params, lengths: list[int], overrides: list[str], *,
                   max_batches: int = 4, batch_tokens: int = 0) -> list[dict]:
    """[{length, loss, tokens, positions (bin starts), curve (mean loss per bin)}] for a
    restored run (lm.train.param_source.restore_for_inference). batch_tokens 0 = the run's
    batch_size x seq_len."""
    mesh = run.pieces.mesh
    tokens = batch_tokens or run.cfg.batch_size * run.cfg.data.seq_len
    out = []
    for length in lengths:
        pieces = eval_time_pieces(run, overrides, length)
        cfg = pieces.cfg
        fn = pieces.params_batch_fn("loss_by_position",
                                    _per_position(pieces.graphdef, pieces.loss_chunk))
        sums, counts = np.zeros(length), np.zeros(length)
        for batch in eval_batches(cfg.data, run.tokenizer,
                                  rows_per_batch(tokens, length, mesh.size), max_batches):
            s, c = fn(params, pieces.replicated_batch(batch))
            sums += np.asarray(s)
            counts += np.asarray(c)
        width = max(1, math.ceil(length / CURVE_BINS))
        starts = list(range(0, length, width))
        curve = [float(sums[a:a + width].sum() / max(counts[a:a + width].sum(), 1.0))
                 for a in starts]
        out.append({"length": length, "loss": float(sums.sum() / max(counts.sum(), 1.0)),
                    "tokens": int(counts.sum()), "positions": starts, "curve": curve})
    return out


def plot_loss_by_position(results: list[dict], path, *, trained_length: int = 0,
                          title: str = "") -> Path:
    """Loss against position, one line per evaluated length (PNG)."""
    from lm.analysis.scaling import _pyplot, save_figure
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in results:
        ax.plot(np.array(r["positions"]) + 0.5 * (r["positions"][1] if len(r["positions"]) > 1
                                                 else 1), r["curve"], label=f"length {r['length']}")
    if trained_length:
        ax.axvline(trained_length, color="k", lw=0.8, ls="--", label="trained length")
    ax.set(xlabel="position", ylabel="validation loss (nats/token)", title=title or
           "loss by position")
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)
