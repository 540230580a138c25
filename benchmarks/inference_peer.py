"""Inference on a real-sized model against `transformers`, in one interleaved run: a
random model of SmolLM-135M's shape (Llama: 30 layers, d_model 576, 9 heads / 3 KV
heads, vocab 49152, tied embeddings; float32 on both sides) written by transformers'
save_pretrained, then, round by round, each side in a fresh process:

  lmlab         `lm import hf` (a process of its own: wall time, peak RSS), the run
                restored for inference (time, process peak RSS), `lm eval`'s eval step
                on [batch, seq] tokens (tokens/s; compile timed apart), and
                lm.sample.generate (what `lm sample` calls) greedy at batch 1 and 8:
                first-token latency with compile (cold) and without (warm), decode tokens/s
  transformers  from_pretrained (time, peak RSS), the forward with labels on the same
                tokens (tokens/s), generate(do_sample=False) at batch 1 and 8: first-token
                latency (max_new_tokens=1) and decode tokens/s ((N - 1) x batch tokens
                over the time N new tokens take beyond the first)

    python benchmarks/inference_peer.py --hf-python ~/.cache/lmlab/hfref-py311/bin/python
    python benchmarks/inference_peer.py --hf-python PY --rounds 3 --new 64 --threads 2

The table gives the median over rounds and lmlab / transformers. torch is not an lmlab
dependency: the transformers side runs in the interpreter given (.ci/run makes one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(batch)]


# ------------------------------------------------------------------ transformers side


def make(out: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).float()
    model.save_pretrained(out)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    words = [f"w{i % 997} x{i % 13}" for i in range(20_000)]  # speed only: any text will do
    tok.train_from_iterator([" ".join(words)], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>", pad_token="</s>",
                                         unk_token="<unk>").save_pretrained(out)


def torch_side(d: Path, batch: int, seq: int, new: int, threads: int) -> dict:
    import torch
    import transformers
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    out = {"load_s": time.perf_counter() - t0, "load_peak_rss_mib": peak_rss_mib()}
    x = torch.tensor(prompt_ids(batch, seq, 1))
    with torch.no_grad():
        model(x, labels=x)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(x, labels=x).loss.item()
            times.append(time.perf_counter() - t)
    out["eval_tokens_per_s"] = batch * seq / statistics.median(times)
    for b in (1, 8):
        ids = torch.tensor(prompt_ids(b, 32, 2))
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=SHAPE["pad_token_id"])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            first = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            total = time.perf_counter() - t
        out[f"b{b}_first_token_s"] = first
        out[f"b{b}_decode_tokens_per_s"] = b * (new - 1) / max(total - first, 1e-9)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# ------------------------------------------------------------------ lmlab side


def lm_import(d: Path, run_dir: Path) -> dict:
    """`lm import hf` in a process of its own: wall time and that process's peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "import", "hf", str(d),
                             "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"lm import hf failed: {proc.stderr.read()[-2000:]}")
    return {"import_s": time.perf_counter() - t0, "import_peak_rss_mib": usage.ru_maxrss / 1024}


def lm_side(run_dir: Path, batch: int, seq: int, new: int) -> dict:
    import jax
    import numpy as np

    from lm.evals.overrides import eval_time_graphdef
    from lm.sample import generate
    from lm.train.param_source import restore_for_inference
    t0 = time.perf_counter()
    run, params, _ = restore_for_inference(run_dir)
    jax.block_until_ready(params)
    out = {"load_s": time.perf_counter() - t0, "load_peak_rss_mib": peak_rss_mib()}
    x = np.asarray(prompt_ids(batch, seq + 1, 1), np.int32)
    rows = {"inputs": x[:, :-1], "targets": x[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "loss_mask": np.ones((batch, seq), np.float32)}
    step, pieces = run.pieces.eval_step(), run.pieces
    t = time.perf_counter()
    jax.block_until_ready(step(params, pieces.replicated_batch(rows)))
    out["eval_compile_s"] = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(step(params, pieces.replicated_batch(rows)))
        times.append(time.perf_counter() - t)
    out["eval_tokens_per_s"] = batch * seq / statistics.median(times)
    graphdef, cfg = eval_time_graphdef(run, [])  # as `lm sample` builds it
    for b in (1, 8):
        prompt = prompt_ids(1, 32, 2)[0]
        kw = dict(temperature=0.0, num_samples=b, max_seq_len=cfg.model.max_seq_len)
        cold, warm = {}, {}
        generate(graphdef, params, prompt, new, timings=cold, **kw)
        generate(graphdef, params, prompt, new, timings=warm, **kw)
        out[f"b{b}_first_token_cold_s"] = cold["first_token_s"]
        out[f"b{b}_first_token_s"] = warm["first_token_s"]
        out[f"b{b}_decode_tokens_per_s"] = warm["decode_tokens"] / warm["decode_s"]
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# ------------------------------------------------------------------ orchestration


def side(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROWS = [("import / load s", "load_s"), ("peak RSS after load, MiB", "load_peak_rss_mib"),
        ("eval tokens/s", "eval_tokens_per_s"), ("eval compile s", "eval_compile_s"),
        ("b1 first token s (warm)", "b1_first_token_s"),
        ("b1 first token s (cold, compile incl.)", "b1_first_token_cold_s"),
        ("b1 decode tokens/s", "b1_decode_tokens_per_s"),
        ("b8 first token s (warm)", "b8_first_token_s"),
        ("b8 first token s (cold, compile incl.)", "b8_first_token_cold_s"),
        ("b8 decode tokens/s", "b8_decode_tokens_per_s"), ("peak RSS, MiB", "peak_rss_mib")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=["run", "make", "torch", "lm"])
    p.add_argument("dirs", nargs="*")
    p.add_argument("--hf-python", help="an interpreter with torch + transformers")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--new", type=int, default=64, help="new tokens per generation")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    if a.mode == "make":
        make(Path(a.dirs[0]))
        return 0
    if a.mode == "torch":
        print(json.dumps(torch_side(Path(a.dirs[0]), a.batch, a.seq, a.new, a.threads)))
        return 0
    if a.mode == "lm":
        print(json.dumps(lm_side(Path(a.dirs[0]), a.batch, a.seq, a.new)))
        return 0
    if not a.hf_python:
        p.error("--hf-python is needed (the transformers side)")
    work = Path(tempfile.mkdtemp(prefix="inference_peer_"))
    subprocess.run([a.hf_python, __file__, "make", str(work / "hf")], check=True, cwd=ROOT)
    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--new", str(a.new)]
    results = {"lmlab": [], "transformers": []}
    for r in range(a.rounds):
        run_dir = work / f"run{r}"
        lm = lm_import(work / "hf", run_dir)
        lm.update(side([sys.executable, __file__, "lm", str(run_dir), *common]))
        lm["load_s"] = lm["import_s"] + lm["load_s"]  # import once, then restore
        lm["load_peak_rss_mib"] = max(lm["import_peak_rss_mib"], lm["load_peak_rss_mib"])
        results["lmlab"].append(lm)
        results["transformers"].append(side([a.hf_python, __file__, "torch", str(work / "hf"),
                                             *common, "--threads", str(a.threads)]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    print(f"\nSmolLM-135M shape, float32, batch {a.batch} x {a.seq} for eval, prompt 32 + "
          f"{a.new} new tokens, median of {a.rounds} interleaved rounds\n")
    print("| | lmlab | transformers | lmlab / transformers |\n|---|---:|---:|---:|")
    for label, key in ROWS:
        lm = [x[key] for x in results["lmlab"] if key in x]
        hf = [x[key] for x in results["transformers"] if key in x]
        a_, b_ = (statistics.median(lm) if lm else None), (statistics.median(hf) if hf else None)
        ratio = f"{a_ / b_:.2f}" if a_ is not None and b_ else ""
        fmt = (lambda v: "" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}"))
        print(f"| {label} | {fmt(a_)} | {fmt(b_)} | {ratio} |")
    lm_imp = statistics.median(x["import_s"] for x in results["lmlab"])
    print(f"\n(lmlab's load = `lm import hf` once, {lm_imp:.1f}s, + restoring the run; "
          f"its RSS the larger of the two processes')")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
