"""`lm data prepare --workers N` vs Hugging Face `datasets` map(num_proc=N), same files.

A synthetic JSONL corpus (documents cut from the embedded Shakespeare text, shuffled
and repeated to --mb megabytes, in --files shards) is written to a temp dir, and a
byte-level BPE tokenizer.json (--vocab) is trained on a sample of it with the
`tokenizers` library. Each round runs both sides, in alternating order, each in a
fresh process:

  lmlab     lm data prepare --set data.corpus=DIR --set data.tokenizer=TOK --workers N
  datasets  load_dataset("json", data_files=FILES, cache_dir=fresh)
              .map(tokenize, batched=True, num_proc=N, remove_columns=...)

Both read the JSONL and write the token ids to disk (lmlab: uint16 shards; datasets:
its arrow cache). With N > 1 each side's workers use one tokenizer thread each
(RAYON_NUM_THREADS=1), so N processes use N cores. Prints seconds, MB/s of input,
tokens/s (lmlab's count includes its BOS/EOS framing, two per document) and peak RSS
(getrusage: the side's main process, and its largest worker).

    python benchmarks/prepare_peer.py --mb 100 --rounds 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each side runs in its own process and prints one JSON line last. lmlab's side calls
# lm.data.prepare, the function `lm data prepare` runs.
LMLAB = r"""
import json, resource, sys
from lm.config import DataConfig
from lm.data import prepare
corpus, tok, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = prepare(DataConfig(corpus=corpus, tokenizer=tok), out, workers=workers)
tokens = s["train"]["tokens"] + s["validation"]["tokens"]
print(json.dumps({"tokens": tokens,
                  "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rss_worker": max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                                    s.get("worker_peak_rss_mb", 0) * 1024)}))
"""

DATASETS = r"""
import json, resource, sys, glob
corpus, tok_path, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import datasets
from tokenizers import Tokenizer
datasets.disable_progress_bars()
tok = Tokenizer.from_file(tok_path)

def tokenize(batch):
    return {"input_ids": [e.ids for e in tok.encode_batch(batch["text"],
                                                          add_special_tokens=False)]}

files = sorted(glob.glob(corpus + "/*.jsonl"))
ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=out)
ds = ds.map(tokenize, batched=True, num_proc=workers if workers > 1 else None,
            remove_columns=ds.column_names)
tokens = 0
for b in ds.with_format("arrow").iter(batch_size=65536):
    tokens += int(b.column("input_ids").combine_chunks().values.__len__())
print(json.dumps({"tokens": tokens,
                  "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_corpus(d: Path, mb: int, files: int, seed: int = 0) -> int:
    sys.path.insert(0, str(ROOT))
    from lm.data.sources import embedded_documents
    text = "\n".join(embedded_documents("shakespeare", "all"))
    rng = random.Random(seed)
    target, written = mb << 20, 0
    outs = [open(d / f"shard-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    i = 0
    while written < target:
        n = rng.randint(200, 8000)
        a = rng.randrange(0, len(text) - n)
        line = json.dumps({"id": i, "text": text[a:a + n]}) + "\n"
        outs[i % files].write(line)
        written += len(line.encode())
        i += 1
    for f in outs:
        f.close()
    return sum(p.stat().st_size for p in d.glob("*.jsonl"))


def train_tokenizer(d: Path, corpus: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def sample():
        with open(next(iter(sorted(corpus.glob("*.jsonl"))))) as f:
            for k, line in enumerate(f):
                if k >= 2000:
                    break
                yield json.loads(line)["text"]

    tok.train_from_iterator(sample(), trainer)
    path = d / "tokenizer.json"
    tok.save(str(path))
    return path


def run_side(name: str, corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "HF_DATASETS_CACHE": str(out), "HF_HUB_OFFLINE": "1"}
    if workers > 1:
        env["RAYON_NUM_THREADS"] = "1"
    code = LMLAB if name == "lmlab" else DATASETS
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(corpus), str(tok), str(out),
                        str(workers)], capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["seconds"] = secs
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare_peer-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        size = make_corpus(corpus, args.mb, args.files)
        tok = train_tokenizer(tmp, corpus, args.vocab)
        print(f"corpus: {size / 1e6:.1f} MB in {args.files} JSONL files; tokenizer: BPE "
              f"{args.vocab}; workers: {args.workers}; cpus: {os.cpu_count()}")
        print(f"{'side':10} {'round':>5} {'s':>7} {'MB/s':>7} {'Mtok/s':>7} "
              f"{'RSS main MB':>11} {'RSS worker MB':>13}")
        rows = {"lmlab": [], "datasets": []}
        for r in range(args.rounds):
            order = ["lmlab", "datasets"] if r % 2 == 0 else ["datasets", "lmlab"]
            for side in order:
                out = tmp / f"out-{side}-{r}"
                res = run_side(side, corpus, tok, out, args.workers)
                rows[side].append(res)
                print(f"{side:10} {r:>5} {res['seconds']:7.1f} {size / 1e6 / res['seconds']:7.1f} "
                      f"{res['tokens'] / 1e6 / res['seconds']:7.2f} {res['rss_main'] / 1024:11.0f} "
                      f"{res['rss_worker'] / 1024:13.0f}", flush=True)
                import shutil
                shutil.rmtree(out, ignore_errors=True)
        best = {s: min(x["seconds"] for x in v) for s, v in rows.items()}
        print(f"best of {args.rounds}: lmlab {size / 1e6 / best['lmlab']:.1f} MB/s, datasets "
              f"{size / 1e6 / best['datasets']:.1f} MB/s: lmlab/datasets = "
              f"{best['datasets'] / best['lmlab']:.2f}x")


if __name__ == "__main__":
    main()
