"""`lm generate`: a JSONL of prompts through the batched engine on a trained tiny run."""

from __future__ import annotations

import json

import pytest
from conftest import lm

PROMPTS = ["ROMEO:", "", "To be, or not to be, that is the question:", "JULIET:\nO Romeo",
           "First Citizen:\nBefore we proceed"]


def test_generate_writes_greedy_texts_in_input_order(tiny_run, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    lines = [{"prompt": p, "id": f"p{i}"} for i, p in enumerate(PROMPTS)]
    lines[3]["stop"] = "e"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = lm("generate", "--run", str(tiny_run), "--in", str(inp), "--out", str(out),
                "--temperature", "0", "--max-new-tokens", "12", "--batch", "2",
                "--pages", "8", "--page-size", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requests/s" in result.stderr and "tokens/s" in result.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(5)]

    from lm.sample import generate
    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(tiny_run)
    tok = run.tokenizer
    for i, (p, row) in enumerate(zip(PROMPTS, rows)):
        ids = [int(t) for t in tok.frame(tok.encode(p))] or [tok.bos_id]
        want = tok.decode(generate(run.pieces.graphdef, params, ids, 12, temperature=0.0,
                                   max_seq_len=64, stop_ids=tok.stop_ids)[0])
        assert row["prompt_tokens"] == len(ids)
        if i == 3 and "e" in want:  # the stop string ends it early
            assert row["text"] == want[:want.index("e")] and row["finish_reason"] == "stop"
        else:
            assert row["text"] == want, (p, row)
            assert row["completion_tokens"] == 12 and row["finish_reason"] == "length"


def test_lm_sample_prints_the_engines_samples(tiny_run):
    """`lm sample` generates through the engine (one request, --num-samples samples):
    its sampled text is the engine's for the seed, framed as before."""
    result = lm("sample", "--run", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens",
                "12", "--temperature", "1", "--top-k", "20", "--seed", "3", "--num-samples",
                "2")
    assert result.returncode == 0, result.stderr[-2000:]
    from lm.infer import Engine, Request
    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(tiny_run)
    tok = run.tokenizer
    ids = [int(t) for t in tok.frame(tok.encode("ROMEO:"))]
    engine = Engine(run.pieces.graphdef, params, slots=2, pages=9, page_size=16)
    got = engine.generate([Request(tuple(ids), max_new_tokens=12, temperature=1.0, top_k=20,
                                   seed=3, stop_ids=tuple(tok.stop_ids), n=2)])[0]
    want = "".join(f"--- sample {i}\nROMEO:{tok.decode(c.tokens)}\n"
                   for i, c in enumerate(got.completions))
    assert result.stdout == want


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\nnot json\n', "line 2: not JSON"),
    ('{"messages": []}\n', 'line 1: needs a "prompt" field (use --chat for messages)'),
    ('{"prompt": 3}\n', '"prompt" must be a string'),
    ("\n", "no requests"),
])
def test_bad_input_is_one_line_exit_2(lm_here, tmp_path, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    result = lm_here("generate", "--run", str(tmp_path), "--in", str(inp),
                     "--out", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_lines_get_the_reply_lm_sample_chat_gives(lm_here, tmp_path):
    """--chat renders each line's messages with the run's template: the greedy reply is
    `lm sample --chat`'s (an imported run whose tokenizer ships a ChatML template)."""
    from test_chat_template import SPECIALS, byte_bpe, jinja_dir
    from test_interop_hf import write_hf_dir

    from lm.interop.hf_import import import_hf
    ids = {"bos_token_id": None, "pad_token_id": None,
           "eos_token_id": SPECIALS.index("<|im_end|>")}
    hf_dir, _ = write_hf_dir(tmp_path / "hf", ids, vocab_size=byte_bpe().get_vocab_size(),
                             max_seq_len=128)
    jinja_dir(tmp_path / "hf")
    assert import_hf(hf_dir, tmp_path / "run") == 0
    chats = [("be brief", "hi there"), ("you are a poet", "a line about the sea")]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": s}, {"role": "user", "content": u}]}) + "\n"
        for s, u in chats))
    result = lm_here("generate", "--run", str(tmp_path / "run"), "--in", str(inp), "--out",
                     str(out), "--chat", "--temperature", "0", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for (system, user), row in zip(chats, rows):
        sample = lm_here("sample", "--run", str(tmp_path / "run"), "--chat", user, "--system",
                         system, "--temperature", "0", "--max-new-tokens", "16")
        assert sample.returncode == 0, sample.stderr
        assert row["text"] + "\n" == sample.stdout, (row, sample.stdout)
    assert all(row["completion_tokens"] for row in rows)


def test_shared_prefix_scheduling_changes_no_text(tiny_run, tmp_path):
    """Prompts with a common head: packed prefill, shared prefix pages and Hydragen decode
    (the defaults) write the texts the engine writes with all three off."""
    head = "First Citizen:\nBefore we proceed any further,"
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"prompt": head + t}) + "\n"
                           for t in ("All:", "Speak, speak.", "You are", "First", "A")))
    texts = []
    for flags in ((), ("--no-pack", "--no-share-prefixes", "--no-hydragen")):
        out = tmp_path / f"out{len(flags)}.jsonl"
        result = lm("generate", "--run", str(tiny_run), "--in", str(inp), "--out", str(out),
                    "--temperature", "0", "--max-new-tokens", "10", "--batch", "4",
                    "--page-size", "8", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        texts.append([json.loads(x)["text"] for x in out.read_text().splitlines()])
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
