"""Downstream task scores through lm-evaluation-harness: which tasks, run offline, and
what is kept of the harness's results.

`evaluate_tasks` runs harness tasks (any name the harness knows, lmlab's embedded
Shakespeare tasks, or tasks in `--include-path` folders) on a `HarnessLM` and returns the
harness's own results dictionary plus `scores`: {task: {metric: value}} with the
harness's metric names (`acc`, `acc_norm`, `acc_stderr`, `word_perplexity`, ...; the
`,none` filter suffix dropped, other filters kept as `metric,filter`) and, for
multiple-choice tasks, what a task scaling law needs (Llama 3 / OLMo ladders):
`correct_nll` (mean over documents of the gold answer's log-likelihood, negated, in
nats), `correct_bpb` (the same per UTF-8 byte of the answer, in bits) and `num_choices`.

Nothing is downloaded: the harness and `datasets` run with HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE set, and a task whose data is not on disk is one ConfigError naming the
dataset. `record`/`read` keep a run's scores in `<run>/evals/tasks-step<N>.json`, which
the results store reads (lm.analysis.results.task_scores).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import math
import os
from pathlib import Path

from lm.errors import ConfigError
from lm.evals.task_config import TaskEvalConfig

def check_config_tasks(cfg: TaskEvalConfig) -> None:
    """Before a run dir exists: the tasks' names and data (one line if not)."""
    if cfg.tasks:
        load_tasks(task_manager([cfg.include_path] if cfg.include_path else []),
                   parse_tasks(cfg.tasks))


def due(cfg: TaskEvalConfig, eval_every: int, step: int, last: int) -> bool:
    return bool(cfg.tasks) and (step % (cfg.every or eval_every) == 0 or step == last)


def evaluate_during_training(run, params, cfg: TaskEvalConfig, step: int, run_dir) -> dict:
    """{"tasks/<task>/<metric>": value} of `params` at `step`, also kept in the run dir
    (process 0). A failing task is reported in one line and yields {}: it never stops
    training or costs a checkpoint."""
    import sys
    import time
    go_offline()
    try:
        from lm.evals.harness import HarnessLM
        start = time.perf_counter()
        lm = HarnessLM(run, params, batch_size=cfg.batch_size, progress=False)
        with contextlib.redirect_stderr(io.StringIO()):  # the harness's progress bars
            results = evaluate_tasks(
                lm, parse_tasks(cfg.tasks), limit=cfg.limit or None,
                num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                include_paths=[cfg.include_path] if cfg.include_path else [],
                bootstrap_iters=0)
    except Exception as e:  # noqa: BLE001 (a task's failure is reported, training goes on)
        print(f"  tasks @ {step}: failed, training continues ({type(e).__name__}: "
              f"{_first_line(e)})", file=sys.stderr, flush=True)
        return {}
    import jax
    if jax.process_index() == 0:
        record(run_dir, step, results["scores"])
    shown = ", ".join(f"{t} {m} {row[m]:.4f}" for t, row in results["scores"].items()
                      for m in [next((m for m in HEADLINE if m in row), None)] if m)
    print(f"  tasks @ {step}: {shown} ({time.perf_counter() - start:.1f}s)", flush=True)
    return flat(results["scores"])


HEADLINE = ("acc", "exact_match", "bits_per_byte", "word_perplexity")  # the console line's
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


def go_offline() -> None:
    """Before `datasets` / `lm_eval` are imported: they read these once."""
    os.environ.update(OFFLINE)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks: expected comma-separated task names, got {text!r}")
    return tasks


def task_manager(include_paths: list[str] = ()):
    """The harness's TaskManager over its own tasks, lmlab's embedded ones and
    `include_paths` (each must be a folder)."""
    go_offline()
    for path in include_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path {path}: no such directory")
    from lm.evals import embedded_tasks
    with _quiet():
        return embedded_tasks.task_manager(list(include_paths))


def check_tasks(manager, tasks: list[str]) -> None:
    """Unknown names: one line with the nearest known ones."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"--tasks: unknown task {name!r}{hint}; `lm eval --list-tasks` "
                              "prints them all")


def load_tasks(manager, tasks: list[str]) -> dict:
    """The harness's task objects, their datasets read from disk; a dataset that is not
    there is one line naming it."""
    from lm_eval.tasks import get_task_dict
    check_tasks(manager, tasks)
    out = {}
    for name in tasks:
        try:
            with _quiet():
                out.update(get_task_dict([name], manager))
        except Exception as e:  # noqa: BLE001 (datasets raises many kinds for "not here")
            if _missing_data(e):
                raise ConfigError(f"task {name}: its data is not on disk ("
                                  f"{_dataset_of(manager, name)}; lmlab runs the harness "
                                  f"offline: {_first_line(e)})") from None
            raise ConfigError(f"task {name} does not load ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    return out


def _missing_data(e: Exception) -> bool:
    """Whether a task's load failed for want of its data (the hub is unreachable offline,
    a local file is missing)."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (FileNotFoundError, ConnectionError)) or any(
        s in text for s in ("offline", "couldn't reach", "not found", "doesn't exist",
                            "does not exist", "no such file", "unable to find"))


def _dataset_of(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    cfg = (entry.cfg if entry is not None else None) or {}
    if not cfg.get("dataset_path") and entry is not None and entry.yaml_path:
        cfg = {"dataset_path": f"(see {entry.yaml_path})"}
    path = cfg.get("dataset_path", "unknown")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    named = cfg.get("dataset_name")
    return (f"dataset {path}" + (f" ({named})" if named else "")
            + (f", files {files}" if files else ""))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@contextlib.contextmanager
def _quiet():
    """The harness and datasets log at INFO/WARNING on import and per task; keep the
    console for lmlab's lines (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def evaluate_tasks(lm, tasks: list[str], *, num_fewshot: int | None = None,
                   limit: int | None = None, include_paths: list[str] = (), manager=None,
                   checked: bool = False, bootstrap_iters: int = 100000, seed: int = 0) -> dict:
    """The harness's results dictionary for `tasks` on `lm`, plus "scores" (see the
    module doc). limit: documents per task (None = all). `manager`/`checked`: a
    TaskManager the caller made and already checked these tasks' data with."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    manager = manager or task_manager(list(include_paths))
    if not checked:
        # Loaded once here so that missing data is one line before any scoring; the harness
        # loads them again (from datasets' cache on disk, cheap) to apply --num-fewshot etc.
        load_tasks(manager, tasks)
    from lm_eval.evaluator import simple_evaluate
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        results = simple_evaluate(model=lm, tasks=tasks,
                                  num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=True, bootstrap_iters=bootstrap_iters,
                                  random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    results["scores"] = scores_of(results)
    return results


def scores_of(results: dict) -> dict:
    """{task: {metric: value}} from a harness results dictionary (module doc)."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        row.update(_correct_answer(results.get("samples", {}).get(task, [])))
        scores[task] = row
    return scores


def _correct_answer(samples: list[dict]) -> dict:
    """correct_nll / correct_bpb / num_choices of a multiple-choice task's samples."""
    nll, bits, choices = [], [], []
    for s in samples:
        args, resps, target = s.get("arguments"), s.get("filtered_resps"), s.get("target")
        if not isinstance(target, int) or not resps or not isinstance(resps[0], (list, tuple)):
            return {}
        continuation = _continuation(args, target)
        if continuation is None or not 0 <= target < len(resps):
            return {}
        ll = float(resps[target][0])
        nll.append(-ll)
        bits.append(-ll / math.log(2) / max(1, len(continuation.encode("utf-8"))))
        choices.append(len(resps))
    if not nll:
        return {}
    return {"correct_nll": sum(nll) / len(nll), "correct_bpb": sum(bits) / len(bits),
            "num_choices": sum(choices) / len(choices)}


def _continuation(args, target: int) -> str | None:
    """The target choice's continuation string in a logged sample's arguments (the
    harness logs them as a list of (context, continuation) or as
    {"gen_args_i": {"arg_0": context, "arg_1": continuation}})."""
    try:
        if isinstance(args, dict):
            return args[f"gen_args_{target}"]["arg_1"]
        return args[target][1]
    except (KeyError, IndexError, TypeError):
        return None


def table(results: dict) -> str:
    """The harness's own results table (markdown)."""
    from lm_eval.utils import make_table
    text = make_table(results)
    return text + ("\n" + make_table(results, "groups") if results.get("groups") else "")


# -- a run's scores on disk ----------------------------------------------------------------
def scores_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "evals" / f"tasks-step{step:08d}.json"


def record(run_dir: str | Path, step: int, scores: dict, meta: dict | None = None) -> Path:
    """Write (atomically) a run's task scores at `step`; later tasks join earlier ones of
    the same step."""
    path = scores_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()).get("tasks", {}) if path.is_file() else {}
    body = {"step": int(step), "tasks": {**old, **scores}, **(meta or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def flat(scores: dict, prefix: str = "tasks") -> dict:
    """{task: {metric: v}} -> {"tasks/<task>/<metric>": v} (metrics.jsonl, TensorBoard,
    summary.json, the results store's columns)."""
    return {f"{prefix}/{task}/{m}": v for task, row in scores.items() for m, v in row.items()}
