"""An lmlab model inside EleutherAI's lm-evaluation-harness (`lm eval --tasks`, and the
`evals.tasks` evaluations during training).

`HarnessLM` is a harness `TemplateLM`: the harness renders every task's documents into
requests, and this class answers them with lmlab's own forward and sampler, sharded over
the run's mesh like the validation loss. The framing follows the harness's HF backend
(`lm_eval/models/huggingface.py`) so that a model imported with `lm import hf` scores what
`transformers` scores:

- text is tokenized as the HF tokenizer's `encode(text)` does: the tokenizer's own framing
  (its post-processor's BOS, if any) around the ids, unless the text already starts with
  the prefix token's text;
- a (context, continuation) pair is split by the harness (`TemplateLM._encode_pair`:
  trailing spaces of the context move to the continuation; the whole text is encoded and
  the context's tokens cut off); an empty context is the prefix token: BOS where the model
  declares one, else EOS;
- `loglikelihood_rolling` scores the harness's disjoint rolling windows of `max_length`
  tokens (the model's `max_seq_len`);
- `generate_until` submits every request to one batched engine (lm/infer: `batch_size`
  slots, paged K/V, continuous batching); each decodes greedily (or samples, if the task
  asks for a temperature) from the context left-truncated to `max_length - max_gen_toks`,
  stops at the model's end-of-sequence ids (kept, decoded with special tokens skipped, as
  transformers' generate returns them) or any stop string, and the text is cut at the
  first stop string. A model the engine refuses is generated one request at a time with
  the KV-cache sampler (lm/sample.py).

Loglikelihood requests are packed: several (context + continuation) sequences share a row,
each with its own segment id and positions from 0, so a row's attention never crosses
requests (the packing training uses) and little compute goes to padding. Requests go
longest first; each call's rows are as long as the bucket (a power of two up to
`max_length`) of its longest request, shorter ones fill the room left, and a call has at
most `batch_size` rows (fewer, a power of two, for a short last call), so a task compiles
a handful of shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lm.data.tokenizers import HFTokenizer, Tokenizer
from lm.errors import ConfigError
from lm.infer import Engine, Request
from lm.sample import generate
from lm.train.step import token_losses

MIN_ROW = 64  # the shortest row bucket
PAGE_SIZE = 16  # tokens per K/V page of generate_until's engine


def prefix_token_id(tok: Tokenizer) -> int:
    """What the harness puts before a text with no context: the tokenizer's BOS where the
    model declares one (transformers' `bos_token_id`), else its EOS (Qwen, GPT-2)."""
    if isinstance(tok, HFTokenizer) and tok.declared["files"]:
        return tok.declared["tokens"].get("bos", (None, tok.eos_id))[1]
    return tok.bos_id


def special_text(tok: Tokenizer, token_id: int) -> str | None:
    """A special token's text (the harness adds EOS's text to the stop strings)."""
    if isinstance(tok, HFTokenizer):
        return tok.tok.decode([int(token_id)], skip_special_tokens=False) or None
    return None


def _scores(logits_BTV, targets_BT):
    """(log-likelihood of the target, whether it is the greedy choice) per token."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    greedy_BT = target_BT >= jnp.max(logits_BTV, axis=-1)
    return target_BT - logz_BT, greedy_BT


def row_lengths(max_length: int, multiple: int = 1) -> list[int]:
    """Row buckets: powers of two from MIN_ROW below max_length, then max_length (all
    rounded up to `multiple`, the loss chunk)."""
    out, n = [], MIN_ROW
    while n < max_length:
        out.append(n)
        n *= 2
    out.append(max_length)
    return sorted({-(-n // multiple) * multiple for n in out})


class HarnessLM(TemplateLM):
    """A restored run (lm.train.param_source.restore_for_inference) as a harness model."""

    def __init__(self, run, params, *, batch_size: int = 8, graphdef=None,
                 max_length: int | None = None, seed: int = 0, progress: bool = True):
        super().__init__()
        self.run, self.params = run, params
        self.pieces = run.pieces
        self.tok: Tokenizer = run.tokenizer
        self.graphdef = graphdef if graphdef is not None else self.pieces.graphdef
        self._max_length = max_length or run.cfg.model.max_seq_len
        ways = self.pieces.mesh.size
        self.rows = max(1, -(-batch_size // ways) * ways)  # rows per call, whole shards
        self.seed = seed
        self.progress = progress
        self._prefix = prefix_token_id(self.tok)
        self._prefix_text = special_text(self.tok, self._prefix)
        loss_chunk = self.pieces.loss_chunk
        self._buckets = row_lengths(self._max_length, loss_chunk or 1)
        self._score = self.pieces.params_batch_fn(
            "harness", lambda p, b: token_losses(self.graphdef, p, b, loss_chunk, _scores)[:2])
        self.tokens_scored = 0  # tokens through the forward (benchmarks)
        self.tokens_generated = 0

    # -- what the harness asks of a model ---------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        frame = add_special_tokens if add_special_tokens is not None else not (
            self._prefix_text and has_bos_prefix(string, self._prefix_text))
        ids = (self.tok.frame(ids) if frame else np.asarray(ids)).tolist()
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens)

    # -- scoring -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(sum of the continuation's log-probabilities, whether every continuation token
        is the greedy one)] for [(strings, context ids, continuation ids)]."""
        seqs, spans = [], []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self._max_length + 1):]
            seqs.append(whole)
            spans.append(min(len(continuation), len(whole) - 1))
        results = [(0.0, True)] * len(seqs)
        bar = tqdm(total=len(seqs), disable=disable_tqdm or not self.progress,
                   desc="lmlab loglikelihood")
        for row_len, rows in self._calls([len(s) - 1 for s in seqs]):
            for i, out in self._score_rows(rows, seqs, spans, row_len).items():
                results[i] = out
            bar.update(sum(len(r) for r in rows))
        bar.close()
        return results

    def _calls(self, lengths: list[int]):
        """(row length, rows of request indices) for each forward call. Requests go
        longest first; a call's rows are as long as the bucket of its longest request,
        and the requests after it are packed into them first-fit (up to `self.rows`
        rows), so shorter requests fill the room longer ones leave."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        k = 0
        while k < len(order):
            row_len = next(b for b in self._buckets if b >= lengths[order[k]])
            rows: list[list[int]] = []
            free: list[int] = []
            while k < len(order):
                i = order[k]
                r = next((r for r, f in enumerate(free) if lengths[i] <= f), None)
                if r is None:
                    if len(rows) == self.rows:
                        break
                    rows.append([])
                    free.append(row_len)
                    r = len(rows) - 1
                rows[r].append(i)
                free[r] -= lengths[i]
                k += 1
            yield row_len, rows

    def _rows_per_call(self, used: int) -> int:
        """Rows a call computes: a power of two >= `used` in whole mesh shards (at most
        `self.rows`), so a short last call does not pay for a full batch."""
        ways = self.pieces.mesh.size
        n = 1
        while n < used:
            n *= 2
        return min(self.rows, -(-n // ways) * ways)

    def _score_rows(self, rows, seqs, spans, row_len) -> dict[int, tuple[float, bool]]:
        shape = (self._rows_per_call(len(rows)), row_len)
        batch = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                       "positions")}
        batch["loss_mask"] = np.zeros(shape, np.float32)
        where = {}
        for r, members in enumerate(rows):
            at = 0
            for seg, i in enumerate(members, start=1):
                s = seqs[i]
                n = len(s) - 1
                batch["inputs"][r, at:at + n] = s[:-1]
                batch["targets"][r, at:at + n] = s[1:]
                batch["segment_ids"][r, at:at + n] = seg
                batch["positions"][r, at:at + n] = np.arange(n)
                where[i] = (r, at + n - spans[i], at + n)
                at += n
        logprob, greedy = jax.device_get(self._score(self.params,
                                                     self.pieces.replicated_batch(batch)))
        self.tokens_scored += int(sum(len(seqs[i]) - 1 for i in where))
        return {i: (float(np.sum(logprob[r, a:b], dtype=np.float64)), bool(np.all(greedy[r, a:b])))
                for i, (r, a, b) in where.items()}

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self._prefix,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation --------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = special_text(self.tok, self.tok.eos_id)
        jobs = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            jobs.append(dict(
                prompt=self.tok_encode(context, left_truncate_len=max(1, self._max_length - max_new)),
                max_new=max_new, temperature=temperature, until=until,
                top_k=int(kwargs.get("top_k", 0) or 0),
                top_p=float(kwargs.get("top_p", 1.0) or 1.0)))
        bar = tqdm(total=len(jobs), desc="lmlab generate_until",
                   disable=disable_tqdm or not self.progress)
        generated = self._generate_batched(jobs, bar)
        if generated is None:  # the engine refuses this model
            generated = self._generate_alone(jobs, bar)
        bar.close()
        stop_ids = set(self.tok.stop_ids)
        out = []
        for (context, gen_kwargs), job, ids in zip((r.args for r in requests), jobs, generated):
            # Cut after (not before) the first end-of-sequence id, as the HF backend
            # decodes what generate returns: a stop id that is an ordinary token (a second
            # eos_token_id in generation_config.json) stays in the text.
            end = next((j + 1 for j, t in enumerate(ids) if t in stop_ids), len(ids))
            ids = ids[:end]
            self.tokens_generated += len(ids)
            text = postprocess_generated_text(self.tok.decode(ids), job["until"], None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate_batched(self, jobs: list[dict], bar) -> list[list[int]] | None:
        """Each job's generated ids (through its first stop id, which is kept, or its
        first stop string), all jobs through one engine; None if the engine refuses the
        model."""
        stop_ids = tuple(int(i) for i in self.tok.stop_ids)
        live = [i for i, job in enumerate(jobs) if job["max_new"] >= 1]
        if not live:
            bar.update(len(jobs))
            return [[] for _ in jobs]
        need = max(min(len(jobs[i]["prompt"]) + jobs[i]["max_new"], self._max_length)
                   for i in live)
        slots = min(self.rows, 1 << (len(live) - 1).bit_length())  # a short task: fewer
        try:
            engine = Engine(self.graphdef, self.params, slots=slots,
                            pages=slots * -(-need // PAGE_SIZE) + 1, page_size=PAGE_SIZE,
                            max_seq_len=self._max_length,
                            decode=lambda ids: self.tok.decode(ids))
        except ConfigError:
            return None
        for i in live:
            job = jobs[i]
            engine.submit(Request(
                tuple(job["prompt"]), max_new_tokens=job["max_new"],
                temperature=job["temperature"], top_k=job["top_k"], top_p=job["top_p"],
                seed=self.seed, stop_ids=stop_ids, keep_stop=True,
                stop_strings=tuple(s for s in job["until"] if s), id=i))
        out: list[list[int]] = [[] for _ in jobs]
        bar.update(len(jobs) - len(live))
        for event in engine.run():
            if event.result is not None:
                out[event.id] = event.result.completions[0].tokens
                bar.update(1)
        return out

    def _generate_alone(self, jobs: list[dict], bar) -> list[list[int]]:
        """Each job's generated ids with the KV-cache sampler, one at a time (a model the
        engine refuses: an MoE whose capacity drops tokens by batch)."""
        stop_ids = set(self.tok.stop_ids)
        out = []
        for job in jobs:
            stop_strings = [s for s in job["until"] if s]

            def done(rows, stop_strings=stop_strings):
                return bool(stop_ids.intersection(rows[0])) or any(
                    s in self.tok.decode(rows[0]) for s in stop_strings)

            out.append(generate(self.graphdef, self.params, job["prompt"], job["max_new"],
                                temperature=job["temperature"], top_k=job["top_k"],
                                top_p=job["top_p"], seed=self.seed,
                                max_seq_len=self._max_length, done=done)[0])
            bar.update(1)
        return out
