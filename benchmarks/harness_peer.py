"""lm-evaluation-harness throughput: lmlab's harness model against the harness's own `hf`
backend on a ~135M model (benchmarks/inference_peer.py's random model of SmolLM-135M's
shape, float32, written by transformers and imported with `lm import hf`), in one
interleaved run: round by round, each side in a fresh process evaluates the same task
with the same documents:

  loglikelihood   shakespeare_next_line (4-way multiple choice) over its first --limit
                  documents: requests/s and scored tokens/s
  generate_until  shakespeare_next_word (greedy, until a newline, at most 16 tokens)
                  over --gen-limit documents: requests/s

Both sides read the embedded task's own JSONL files through a plain `json` copy of its
YAML (the transformers env has no lmlab). Times cover the harness's evaluation (request
building, the model, metrics), not the model's load. Each side evaluates the task twice
in its process: "cold" is the first (lmlab's compiles included, as a user waits for them
on a short evaluation), "warm" the second (what a long evaluation runs at).

    python benchmarks/harness_peer.py --hf-python ~/.cache/lmlab/hfref-py311/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"loglikelihood": "shakespeare_next_line", "generate_until": "shakespeare_next_word"}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def plain_tasks(out: Path) -> Path:
    """The embedded tasks' YAML with `dataset_path: json` and absolute data files, named
    bench_<task>."""
    src = ROOT / "lm" / "evals" / "tasks"
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS.values():
        lines = []
        for line in (src / f"{task}.yaml").read_text().splitlines():
            if line.startswith("custom_dataset:") or line.startswith("tag:"):
                continue
            if line.startswith("task:"):
                line = f"task: bench_{task}\ndataset_path: json"
            elif line.strip().startswith(("test:", "fewshot:")) and line.strip().endswith(".jsonl"):
                key, name = line.strip().split(":", 1)
                line = f"    {key}: {src / name.strip()}"
            elif line.startswith("  max_gen_toks:"):
                line = "  max_gen_toks: 16"
            lines.append(line)
        (folder / f"bench_{task}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def hf_side(d: Path, folder: Path, kind: str, limit: int, threads: int) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    torch.set_num_threads(threads)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    model = lm_eval.api.registry.get_model("hf")(pretrained=str(d), dtype="float32",
                                                  batch_size=8, device="cpu")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(model=model, tasks=[f"bench_{TASKS[kind]}"], limit=limit,
                                      task_manager=manager, bootstrap_iters=0,
                                      log_samples=True)
        times.append(time.perf_counter() - start)
    return _summary(res, times, kind)


def lm_side(run: Path, folder: Path, kind: str, limit: int) -> dict:
    from lm.evals.downstream import evaluate_tasks, go_offline
    go_offline()
    from lm.evals.harness import HarnessLM
    from lm.train.param_source import restore_for_inference
    setup, params, _ = restore_for_inference(run)
    model = HarnessLM(setup, params, batch_size=8, progress=False)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        res = evaluate_tasks(model, [f"bench_{TASKS[kind]}"], limit=limit,
                             include_paths=[str(folder)], bootstrap_iters=0)
        times.append(time.perf_counter() - start)
    out = _summary(res, times, kind)
    out["tokens_scored"] = model.tokens_scored // 2
    return out


def _summary(res: dict, seconds: list[float], kind: str) -> dict:
    task = f"bench_{TASKS[kind]}"
    samples = res["samples"][task]
    requests = sum(len(s["filtered_resps"]) if kind == "loglikelihood" else 1 for s in samples)
    metric = "acc,none" if kind == "loglikelihood" else "exact_match,first_word"
    value = res["results"][task].get(metric, res["results"][task].get("exact_match,none"))
    return {"cold": seconds[0], "warm": seconds[1], "requests": requests, "metric": value,
            "first": [s["filtered_resps"] for s in samples[:2]]}


def side(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE,
                                                                   **(env or {})})
    if out.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-python", default="", help="a Python with torch, transformers, lm-eval")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=int, default=48, help="multiple-choice documents")
    p.add_argument("--gen-limit", type=int, default=8, help="generation documents")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--side", default="", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        d, folder = Path(args.dir), Path(args.dir) / "tasks"
        limit = args.limit if args.kind == "loglikelihood" else args.gen_limit
        if args.side == "hf":
            result = hf_side(d / "hf", folder, args.kind, limit, args.threads)
        else:
            result = lm_side(d / "run", folder, args.kind, limit)
        print(json.dumps(result))
        return 0

    if not args.hf_python:
        p.error("--hf-python is required")
    work = Path(tempfile.mkdtemp(prefix="harness_peer_"))
    subprocess.run([args.hf_python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from inference_peer import make; from pathlib import Path; "
                    "make(Path(sys.argv[2]))", str(ROOT / "benchmarks"), str(work / "hf")],
                   check=True)
    subprocess.run([sys.executable, "-m", "lm.cli", "import", "hf", str(work / "hf"),
                    "--run-dir", str(work / "run")], check=True, capture_output=True)
    plain_tasks(work)
    me = [sys.executable, __file__, "--dir", str(work), "--limit", str(args.limit),
          "--gen-limit", str(args.gen_limit), "--threads", str(args.threads)]
    hf = [args.hf_python, __file__, "--hf-python", args.hf_python, "--dir", str(work),
          "--limit", str(args.limit), "--gen-limit", str(args.gen_limit),
          "--threads", str(args.threads)]
    rows: dict = {}
    for r in range(args.rounds):
        for kind in TASKS:
            for name, cmd in (("lmlab", me), ("hf", hf)):
                env = {"PYTHONPATH": str(ROOT)} if name == "lmlab" else {}
                res = side(cmd + ["--side", name, "--kind", kind], env)
                rows.setdefault((kind, name), []).append(res)
                print(f"round {r} {kind:14s} {name:5s} cold {res['cold']:7.1f}s warm "
                      f"{res['warm']:7.1f}s, {res['requests']} requests, metric "
                      f"{res['metric']}", flush=True)
    print(f"\n{Path(work)}: SmolLM-135M shape, float32, {args.rounds} rounds (median)")
    print("| request type | side | requests | cold s | warm s | warm requests/s | warm tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in TASKS:
        rate = {}
        tokens = rows[(kind, "lmlab")][0].get("tokens_scored", 0) if kind == "loglikelihood" else 0
        for name in ("lmlab", "hf"):
            runs = rows[(kind, name)]
            cold = statistics.median(x["cold"] for x in runs)
            warm = statistics.median(x["warm"] for x in runs)
            n = runs[0]["requests"]
            rate[name] = (n / cold, n / warm)
            tps = f"{tokens / warm:.0f}" if tokens else "-"
            print(f"| {kind} | {name} | {n} | {cold:.1f} | {warm:.1f} | {n / warm:.2f} | {tps} |")
        print(f"| {kind} | lmlab / hf | | {rate['lmlab'][0] / rate['hf'][0]:.2f}x | "
              f"{rate['lmlab'][1] / rate['hf'][1]:.2f}x | | |")
    same = all(rows[(k, 'lmlab')][0]['metric'] == rows[(k, 'hf')][0]['metric'] for k in TASKS)
    print(f"same scores on both sides: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
