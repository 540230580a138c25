"""End-to-end training through the real CLI: resume reproduces the uninterrupted run
(with and without prefetch), divergence is recorded at the right step and never checkpointed, one
signalled process stops a whole pod after the same step, metrics/TensorBoard/summary
are written, eval and sample work."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from conftest import TINY, lm, sets, train_losses


pytestmark = pytest.mark.slow  # every test here runs `lm` end to end


def test_run_dir_has_metrics_tensorboard_summary(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 32
    assert summary["params"] > summary["non_embedding_params"] > 0
    assert summary["training_flops"] == summary["flops_per_token"] * summary["tokens_seen"]
    assert summary["best_val_loss"] <= summary["final_val_loss"] + 1e-9
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    for key in ("loss", "z_loss", "lr", "grad_norm", "update_rms", "param_norm",
                "attn_logit_max/0", "attn_logit_max/1", "resid_rms/0", "resid_rms/1",
                "logit_mean", "logz_mean",
                "tokens_per_s", "step_time", "mfu"):
        assert key in train[-1], key
    assert [r["step"] for r in evals] == [6, 12]
    assert all(math.isfinite(r["loss"]) and r["bpb"] > 0 for r in evals)
    assert train[-1]["loss"] < train[0]["loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/bpb" in tags
    assert [e.step for e in acc.Scalars("eval/loss")] == [6, 12]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["model"]["vocab_size"] == 259


def _interrupted_then_resumed(tmp_path, fault: str, expected_code: int, extra=()):
    full = tmp_path / "full"
    assert lm("train", "--run-dir", str(full), *sets(*TINY, "log_every=1", *extra)
              ).returncode == 0
    run = tmp_path / "resumed"
    first = lm("train", "--run-dir", str(run), *sets(*TINY, "log_every=1", *extra),
               env={"LMLAB_FAULT": fault})
    assert first.returncode == expected_code, first.stderr[-2000:]
    assert max(train_losses(run)) == 6  # it really stopped at step 6
    second = lm("train", "--run-dir", str(run), *sets(*TINY, "log_every=1", *extra))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step" in second.stdout
    a, b = train_losses(full), train_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # exactly: model, optimizer, RNG and data iterator all resumed
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    return second


def test_sigterm_checkpoints_and_resume_reproduces_uninterrupted_losses(tmp_path):
    second = _interrupted_then_resumed(tmp_path, "sigterm@6", 128 + 15)
    assert "resumed from step 6" in second.stdout


def test_resume_with_deep_prefetch_and_read_threads_reproduces_uninterrupted_losses(tmp_path):
    # The prefetcher has read up to 4 batches past step 6 when it stops: the checkpoint
    # must hold the position after the batch step 6 consumed, not after those.
    second = _interrupted_then_resumed(tmp_path, "sigterm@6", 128 + 15,
                                       extra=("data.prefetch=4", "data.read_threads=2"))
    assert "resumed from step 6" in second.stdout


def test_hard_kill_resumes_from_last_periodic_checkpoint(tmp_path):
    second = _interrupted_then_resumed(tmp_path, "sigkill@6", -9)
    assert "resumed from step 4" in second.stdout  # checkpoint_every=4


def test_gradient_accumulation_matches_full_batch(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert lm("train", "--run-dir", str(one), *sets(*TINY, "steps=4")).returncode == 0
    assert lm("train", "--run-dir", str(two), *sets(*TINY, "steps=4", "grad_accum=2")
              ).returncode == 0
    a, b = train_losses(one), train_losses(two)
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)],
                               rtol=1e-5)


def test_divergence_is_recorded_and_last_good_checkpoint_kept(tmp_path):
    run = tmp_path / "diverge"
    result = lm("train", "--run-dir", str(run),
                *sets(*TINY, "optim.lr=1e30", "optim.clip_norm=0", "optim.warmup_steps=0",
                      "checkpoint_every=1"))
    assert result.returncode == 3, result.stderr[-2000:]
    status = json.loads((run / "summary.json").read_text())["status"]
    assert status.startswith("diverged at step ")
    bad_step = int(status.rsplit(" ", 1)[1])
    kept = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert kept and max(kept) < bad_step


def _checkpoint_steps(run) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


# 7: noticed one step late, after step 8 (a checkpoint step) was dispatched; 8: a
# checkpoint step itself, whose state must be verified before it is saved.
@pytest.mark.parametrize("at", [7, 8])
def test_nan_at_a_known_step_is_diverged_there_and_never_checkpointed(tmp_path, at):
    from lm.train.param_source import restore_for_inference

    run = tmp_path / "nan"
    result = lm("train", "--run-dir", str(run), *sets(*TINY, "log_every=1"),
                env={"LMLAB_FAULT": f"nan@{at}"})
    assert result.returncode == 3, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == f"diverged at step {at}"
    assert summary["steps"] == at - 1
    assert max(train_losses(run)) == at - 1  # no record of the non-finite step
    assert _checkpoint_steps(run) == [4]  # checkpoint_every=4: 8 was never written
    _, params, step = restore_for_inference(run)
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


POD = TINY + ["batch_size=8", "mesh.data=-1", "stop_sync_every=5"]
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _pod(run, env=None):
    return lm("launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
              "train", "--run-dir", str(run), *sets(*POD), env=env, timeout=240)


@pytest.mark.slow
def test_one_signalled_process_stops_the_whole_pod_after_the_same_step(tmp_path):
    reference = tmp_path / "reference"  # one process, the same 8 devices, uninterrupted
    result = lm("train", "--run-dir", str(reference), *sets(*POD), env=EIGHT)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "pod"
    # Only process 1 gets SIGTERM, during step 6; the processes agree at step 10.
    result = _pod(run, env={"LMLAB_FAULT": "sigterm@6", "LMLAB_FAULT_PROCESS": "1"})
    assert result.returncode == 128 + 15, result.stdout[-2000:] + result.stderr[-3000:]
    for p in (0, 1):
        assert f"[p{p}] stopped by signal 15 at step 10; checkpoint saved" in result.stdout
    assert 10 in _checkpoint_steps(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 10
    result = _pod(run)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from step 10" in result.stdout
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-5)


def test_changed_config_in_existing_run_dir_is_refused(tiny_run):
    result = lm("train", "--run-dir", str(tiny_run), *sets(*TINY, "model.n_layers=3"))
    assert result.returncode == 2
    assert "model.n_layers" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_and_sample_cli(tiny_run):
    result = lm("eval", "--run", str(tiny_run))
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["step"] == 12 and math.isfinite(out["val_loss"]) and out["val_bpb"] > 0
    args = ["sample", "--run", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "20",
            "--seed", "3", "--top-k", "20", "--top-p", "0.9"]
    a, b = lm(*args), lm(*args)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:")
    other = lm(*args[:-6], "--seed", "4", "--temperature", "1.5")
    assert other.returncode == 0 and other.stdout != a.stdout


def test_data_prepare_cli_then_train_on_the_shards(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "words and more words " * (i % 7 + 1)}) + "\n"
                              for i in range(40)))
    out = tmp_path / "prepared"
    result = lm("data", "prepare", *sets(f"data.corpus={corpus}"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[0])["train"]["docs"] > 0
    run = tmp_path / "run"
    result = lm("train", "--run-dir", str(run), *sets(*TINY, "steps=3", f"data.corpus={out}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(train_losses(run)) == [2, 3]


def test_a_run_trained_on_a_mesh_is_sampled_and_evaluated_on_one_device(tmp_path):
    run = tmp_path / "run"
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = lm("train", "--run-dir", str(run),
                *sets(*TINY, "steps=2", "mesh.data=1", "mesh.tensor=2", "checkpoint_every=2",
                      "eval_every=2"), env=two)
    assert result.returncode == 0, result.stderr[-2000:]
    sample = lm("sample", "--run", str(run), "--max-new-tokens", "5")
    assert sample.returncode == 0, sample.stderr[-2000:]
    ev = lm("eval", "--run", str(run), "--batches", "1")
    assert ev.returncode == 0 and json.loads(ev.stdout)["step"] == 2, ev.stderr[-2000:]


def test_device_peak_flops_reads_the_one_chip_table():
    # MFU's peak comes from lm/chips.py, the table `lm compile` estimates with.
    from types import SimpleNamespace

    from lm.chips import CHIPS
    from lm.train.mfu import device_peak_flops
    for kind, chip in [("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
                       ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-40GB", "A100")]:
        peak, source = device_peak_flops(SimpleNamespace(platform="gpu", device_kind=kind))
        assert peak == CHIPS[chip].peak_bf16 and chip in source, (kind, source)
    peak, source = device_peak_flops(SimpleNamespace(platform="tpu", device_kind="TPU v9"))
    assert peak != peak and "unknown device kind" in source
