"""The downstream tasks shipped in lm/evals/tasks (lm/evals/embedded_tasks.py): the data
is exactly a fresh build from the corpus, every doc's gold is the corpus's own text, and
lm-evaluation-harness (0.4.13, unmocked) loads, renders and scores each task offline with
a real (tiny) model: a character n-gram model of the train split."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import subprocess
import sys

import pytest
from conftest import ROOT
from lm_eval import evaluator
from lm_eval.api.model import LM

from lm.data.sources import embedded_documents, embedded_ids
from lm.evals import embedded_tasks as et

MC = ("shakespeare_next_line", "shakespeare_speaker")


def _docs(task: str, split: str) -> list[dict]:
    with open(et.TASKS_DIR / f"{task}.{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    """Each validation play's text as the docs quote it (lines right-stripped)."""
    texts = dict(zip(embedded_ids(), embedded_documents("shakespeare", "all")))
    return {p: "\n".join(t.rstrip() for t in texts[p].split("\n"))
            for p in et.TEST_WORKS + et.FEWSHOT_WORKS}


@pytest.fixture(scope="module")
def manager():
    return et.task_manager(include_defaults=False)


def test_shipped_data_is_a_fresh_build_byte_for_byte():
    built = et.build()
    assert built == et.build()  # deterministic
    assert sorted(p.name for p in et.TASKS_DIR.glob("*.jsonl")) == sorted(built)
    for name, data in built.items():
        assert (et.TASKS_DIR / name).read_bytes() == data, (
            f"{name} differs from a fresh build: python -m lm.evals.embedded_tasks --build")
    assert sum(map(len, built.values())) < 600_000
    assert sorted(p.stem for p in et.TASKS_DIR.glob("*.yaml")) == sorted(et.TASK_NAMES)


@pytest.mark.parametrize("task", et.TASK_NAMES)
def test_docs_quote_the_held_out_plays_and_few_shots_come_from_another(task, plays):
    test_n, fewshot_n = et.PER_PLAY[task]
    splits = {"test": (et.TEST_WORKS, test_n), "fewshot": (et.FEWSHOT_WORKS, fewshot_n)}
    for split, (works, n) in splits.items():
        if not n:
            assert not (et.TASKS_DIR / f"{task}.{split}.jsonl").exists()
            continue
        docs = _docs(task, split)
        assert collections.Counter(d["play"] for d in docs) == {w: n for w in works}
        assert len({d["id"] for d in docs}) == len(docs)
        for d in docs:
            text = plays[d["play"]]
            if task == "shakespeare_perplexity":
                assert len(d["text"]) >= et.PASSAGE_CHARS and d["text"] in text
                continue
            ctx = d["context"]
            assert ctx == ctx.strip() and ctx  # no whitespace at either end
            if task == "shakespeare_next_word":
                assert f"{ctx} {d['target']}" in text or f"{ctx}  {d['target']}" in text
                continue
            choices, gold = d["choices"], d["gold"]
            assert len(set(choices)) == et.N_CHOICES and 0 <= gold < et.N_CHOICES
            assert all(c == c.strip() for c in choices)
            sep = "\n" if task == "shakespeare_next_line" else "\n\n"
            assert ctx + sep + choices[gold] + "\n" in text  # the gold is what follows
            for c in choices:  # every choice is a line of the same play
                assert f"\n{c}\n" in text
            if task == "shakespeare_next_line":  # distractors of similar length
                assert all(abs(len(c) - len(choices[gold])) <= 12 for c in choices)


@pytest.mark.parametrize("task", MC)
def test_gold_positions_are_shuffled(task):
    docs = _docs(task, "test")
    counts = collections.Counter(d["gold"] for d in docs)
    assert sorted(counts) == list(range(et.N_CHOICES))
    assert all(0.15 * len(docs) <= c <= 0.35 * len(docs) for c in counts.values()), counts


def test_requests_and_few_shot_contexts(manager):
    tasks = manager.load(list(et.TASK_NAMES))["tasks"]
    assert sorted(tasks) == sorted(et.TASK_NAMES)
    per_doc = {"shakespeare_next_line": et.N_CHOICES, "shakespeare_speaker": et.N_CHOICES,
               "shakespeare_perplexity": 1, "shakespeare_next_word": 1}
    for name, task in tasks.items():
        n_docs = et.PER_PLAY[name][0] * len(et.TEST_WORKS)
        shots = 0 if name == "shakespeare_perplexity" else 2
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(1234)
        task.build_all_requests()
        assert len(task.eval_docs) == n_docs
        assert len(task.instances) == n_docs * per_doc[name]
        test_lines = {ln for d in _docs(name, "test")
                      for ln in (d.get("context") or d["text"]).split("\n") if len(ln) > 30}
        for inst in task.instances:
            ctx = inst.args[0]
            if name == "shakespeare_perplexity":
                assert ctx == inst.doc["text"]
                continue
            assert ctx.endswith(inst.doc["context"]) and not ctx[-1].isspace()
            shots_text = ctx[: -len(inst.doc["context"])]
            assert shots_text.endswith("\n\n") and not test_lines & set(shots_text.split("\n"))
            if name in MC:  # continuation: the delimiter, then the choice
                sep = "\n" if name == "shakespeare_next_line" else "\n\n"
                assert inst.args[1] == sep + inst.doc["choices"][inst.idx]
            else:
                assert inst.args[1]["until"] == ["\n"]


class CharNgram(LM):
    """A character n-gram model of (part of) the train split, add-one smoothed: scores
    continuations, rolls over whole texts, generates greedily."""

    def __init__(self, n: int = 4, chars: int = 1_500_000):
        super().__init__()
        text = "\n\n".join(embedded_documents("shakespeare", "train"))[:chars]
        self.n, self.vocab = n, sorted(set(text))
        self.counts: collections.Counter = collections.Counter()
        for k in range(1, n + 1):
            self.counts.update(text[i:i + k] for i in range(len(text) - k + 1))

    def _logp(self, history: str, c: str) -> float:
        h = history[-(self.n - 1):]
        return math.log((self.counts[h + c] + 1) / (self.counts[h] + len(self.vocab) + 1)) \
            if h else math.log((self.counts[c] + 1) / (self.counts.total() + len(self.vocab)))

    def _score(self, context: str, continuation: str) -> float:
        return sum(self._logp(context + continuation[:i], c) for i, c in enumerate(continuation))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(self._score(*r.args), False) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [self._score("", r.args[0]) for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ctx, kwargs = r.args
            text = ""
            for _ in range(kwargs.get("max_gen_toks", 32)):
                text += max(self.vocab, key=lambda c: self._logp(ctx + text, c))
                if any(u in text for u in kwargs["until"]):
                    text = text[: min(text.index(u) for u in kwargs["until"] if u in text)]
                    break
            out.append(text)
        return out


class Coin(CharNgram):
    """Random scores: multiple-choice accuracy near 1 / 4."""

    def __init__(self):
        LM.__init__(self)
        self.rng = random.Random(0)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [(self.rng.random(), False) for _ in requests]


class TurnTaking(Coin):
    """Scores a speaker by the dialogue's turns: the one before the last speaker (two
    people talking) best, then anyone else on stage in the context, the last one least."""

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ctx, cont = r.args
            said = [ln for ln in ctx.split("\n") if et._HEADER.fullmatch(ln)]
            name = cont.strip()
            score = (3.0 if said[-2:-1] == [name] else 1.0 if said[-1:] == [name]
                     else 2.0 if name in said else 0.0)
            out.append((score + 0.1 * self.rng.random(), False))
        return out


def _evaluate(model, manager, tasks) -> dict:
    out = evaluator.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager,
                                    bootstrap_iters=0, log_samples=False)
    return out["results"]


def test_a_char_ngram_model_scores_every_task(manager):
    """Its four characters of context cannot tell a line from another of the same play
    and length, nor one speaker from another: chance, by design; its perplexity is real."""
    res = _evaluate(CharNgram(), manager, et.TASK_NAMES)
    for name in MC:
        assert 0.15 < res[name]["acc,none"] < 0.35 and 0.15 < res[name]["acc_norm,none"] < 0.35
    ppl = res["shakespeare_perplexity"]
    assert 2.0 < ppl["bits_per_byte,none"] < 3.5
    assert math.isclose(ppl["byte_perplexity,none"], 2 ** ppl["bits_per_byte,none"], rel_tol=1e-6)
    assert ppl["word_perplexity,none"] > ppl["byte_perplexity,none"]
    assert 0.0 <= res["shakespeare_next_word"]["exact_match,first_word"] < 0.1


def test_the_speaker_task_rewards_following_the_dialogue(manager):
    res = _evaluate(TurnTaking(), manager, ["shakespeare_speaker"])["shakespeare_speaker"]
    assert res["acc,none"] > 0.35, res  # chance: 0.25 (its standard error: 0.025)


def test_random_scores_give_chance_accuracy(manager):
    res = _evaluate(Coin(), manager, MC)
    for name in MC:
        assert abs(res[name]["acc,none"] - 1 / et.N_CHOICES) < 0.07, res[name]


def test_tasks_load_offline_from_any_directory_beside_the_builtin_ones(tmp_path):
    """A fresh process, elsewhere, with the Hub off: the names resolve next to the
    harness's own, the data loads, and nothing is written into the package's folder."""
    before = {p.name: p.stat().st_mtime_ns for p in et.TASKS_DIR.iterdir()}
    script = (
        "from lm.evals import embedded_tasks as et\n"
        "tm = et.task_manager()\n"
        "assert 'hellaswag' in tm.all_tasks and 'shakespeare' in tm.all_tags\n"
        "tasks = tm.load(['shakespeare'])['tasks']\n"
        "print({n: len(t.eval_docs) for n, t in sorted(tasks.items())})\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = {n: et.PER_PLAY[n][0] * len(et.TEST_WORKS) for n in sorted(et.TASK_NAMES)}
    assert out.stdout.strip().splitlines()[-1] == repr(counts)
    assert {p.name: p.stat().st_mtime_ns for p in et.TASKS_DIR.iterdir()} == before
