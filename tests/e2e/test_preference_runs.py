"""`lm train --init-from RUN --set objective=dpo|simpo|orpo`: on pairs whose chosen
completion is the corpus's kind of text and whose rejected one is garbled, DPO's loss
falls and its implicit-reward accuracy and margin rise from the initial policy's
(log 2, 0, 0), a resumed run equals the uninterrupted one, SimPO and ORPO train, and bad
pairs are one line naming the record (exit 2)."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import TINY, assert_train_refused, lm, sets, train_losses

pytestmark = pytest.mark.slow  # every test here runs `lm` end to end

PROMPTS = ["KING HENRY:", "HAMLET:", "First Citizen:", "ROMEO:", "JULIET:", "MACBETH:"]
LINES = [" What say you, my lord?", " Good night, sweet prince.", " I will speak to him.",
         " Come, let us away."]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            good = rng.choice(LINES)
            bad = "".join(rng.choice("qxzjvkw ") for _ in range(len(good)))
            f.write(json.dumps({"prompt": rng.choice(PROMPTS), "chosen": good,
                                "rejected": bad}) + "\n")
    return path


def _records(run, kind="train"):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == kind]


def dpo(pairs, *extra):
    return [*TINY, "objective=dpo", f"data.preferences={pairs}", "optim.lr=3e-3",
            "log_every=1", *extra]


def test_dpo_learns_the_preference_and_resumes_as_if_uninterrupted(tiny_run, pairs, tmp_path):
    full = tmp_path / "full"
    result = lm("train", "--run-dir", str(full), "--init-from", str(tiny_run), *sets(*dpo(pairs)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference (frozen initial policy): checkpoint step 12" in result.stdout
    train, evals = _records(full), _records(full, "eval")
    first, last = train[0], train[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0
    assert last["logp_chosen"] > first["logp_chosen"] or last["logp_rejected"] < first["logp_rejected"]
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[-1]["reward_accuracy"] > 0.9 and evals[-1]["loss"] < evals[0]["loss"]
    pin = json.loads((full / "dpo_reference.json").read_text())
    assert pin == {"kind": "run", "path": str(tiny_run), "step": 12}
    summary = json.loads((full / "summary.json").read_text())
    assert summary["teacher_flops_per_token"] == pytest.approx(summary["flops_per_token"] / 4)

    run = tmp_path / "resumed"
    cut = lm("train", "--run-dir", str(run), "--init-from", str(tiny_run), *sets(*dpo(pairs)),
             env={"LMLAB_FAULT": "sigterm@6"})
    assert cut.returncode == 128 + 15, cut.stderr[-2000:]
    again = lm("train", "--run-dir", str(run), "--init-from", str(tiny_run), *sets(*dpo(pairs)))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step" in again.stdout
    assert train_losses(run) == train_losses(full)
    assert ([r["reward_margin"] for r in _records(run)]
            == [r["reward_margin"] for r in train])


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_simpo_and_orpo_train_without_a_reference(tiny_run, pairs, tmp_path, objective):
    run = tmp_path / objective
    result = lm("train", "--run-dir", str(run), "--init-from", str(tiny_run),
                *sets(*dpo(pairs, f"objective={objective}", "steps=8", "eval_every=8")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference" not in result.stdout and not (run / "dpo_reference.json").exists()
    train = _records(run)
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["reward_margin"] > train[0]["reward_margin"]


def test_bad_pairs_are_one_line_naming_the_record(lm_here, tmp_path):
    cases = [({"prompt": "a", "chosen": "b"}, "line 2: missing 'rejected'"),
             ({"prompt": "a", "chosen": "", "rejected": "c"}, "line 2: 'chosen' is an empty"),
             ({"chosen": "b", "rejected": "c"}, "line 2: needs a 'prompt' string"),
             ({"prompt": "x" * 40, "chosen": "b", "rejected": "c"},
              "line 2: the prompt is 41 tokens, data.seq_len=32 leaves no room")]
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    for i, (record, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(good + "\n" + json.dumps(record) + "\n")
        assert_train_refused(lm_here, tmp_path / f"run{i}",
                             ["objective=simpo", f"data.preferences={path}"], message)
    assert_train_refused(lm_here, tmp_path / "noref",
                         ["objective=dpo", f"data.preferences={path}"], "needs init_from")
    assert_train_refused(lm_here, tmp_path / "odd",
                         ["objective=orpo", f"data.preferences={path}", "batch_size=3"],
                         "must be even")
    assert_train_refused(lm_here, tmp_path / "nopairs", ["objective=orpo"],
                         "needs data.preferences")


def test_batched_trials_sweep_beta_in_one_program_as_each_alone(tiny_run, pairs, tmp_path):
    """Two DPO trials at different beta from one --init-from, one program and one shared
    reference: each equals the same run alone."""
    from lm import config as config_lib
    from lm.configs import DEFAULT_CONFIG
    from lm.train.loop import train
    from lm.train.trials import train_group
    base = config_lib.apply_overrides(config_lib.load_config_file(DEFAULT_CONFIG), dpo(
        pairs, f"init_from={tiny_run}", "steps=4", "eval_every=4", "tensorboard=false"))
    cfgs = [config_lib.apply_overrides(base, [f"name=b{b}", f"preference.beta={b}"])
            for b in (0.1, 0.5)]
    assert train_group(cfgs, [tmp_path / "group" / c.name for c in cfgs]) == [0, 0]
    assert train(cfgs[1], tmp_path / "alone") == 0
    group = tmp_path / "group" / "b0.5"
    assert train_losses(group) == pytest.approx(train_losses(tmp_path / "alone"), rel=1e-5)
    assert train_losses(group) != train_losses(tmp_path / "group" / "b0.1")
    assert (_records(group, "eval")[-1]["reward_margin"]
            == pytest.approx(_records(tmp_path / "alone", "eval")[-1]["reward_margin"], rel=1e-4))
