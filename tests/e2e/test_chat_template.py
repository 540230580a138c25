"""Chat `messages` instruction data rendered with the tokenizer's chat template
(lm/data/chat_template.py, lm/data/instruction.py): the text is transformers'
apply_chat_template's (checked against transformers in the LMLAB_HF_PYTHON environment,
tests/hf_reference.py; skipped without it), the loss covers each assistant turn exactly,
`lm import hf` carries the template into the run dir where --init-from finds it, and bad
templates or records are one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_train_refused
from test_interop_hf import HERE, hf_python, needs_hf, write_hf_dir

from lm.config import DataConfig
from lm.data import load_tokenizer, packed_rows
from lm.data.chat_template import find_chat_template
from lm.data.instruction import Chat, tokenize_records

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen2.5-Instruct's template (ChatML; a default system message; tools).
QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + tool_call.function.name + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Meta-Llama-3-Instruct's template: the BOS comes from the template, content is trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
          "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
          "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, or café ☕ brown.  "}],
    [{"role": "user", "content": "Say hi\n"}, {"role": "assistant", "content": " hi there!"},
     {"role": "user", "content": "And bye."}, {"role": "assistant", "content": "Bye!"}],
]
# What each template emits for the assistant turns of CHATS (the loss covers exactly this)
TURNS = {"chatml": [["4.<|im_end|>\n"],
                    ["Blue.<|im_end|>\n", "Green, or café ☕ brown.  <|im_end|>\n"],
                    [" hi there!<|im_end|>\n", "Bye!<|im_end|>\n"]],
         "llama3": [["4.<|eot_id|>"], ["Blue.<|eot_id|>", "Green, or café ☕ brown.<|eot_id|>"],
                    ["hi there!<|eot_id|>", "Bye!<|eot_id|>"]]}


def byte_bpe():
    """A small byte-level BPE tokenizer (every text encodes) with ChatML and Llama-3
    special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.dumps(CHATS), QWEN2, LLAMA3], trainer)
    return tok


def tokenizer_dir(path: Path, template, jinja: str | None = None, **config) -> Path:
    """tokenizer.json + tokenizer_config.json (chat_template, special tokens) [+ a
    chat_template.jinja]."""
    path.mkdir(parents=True, exist_ok=True)
    byte_bpe().save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path / "tokenizer.json"


def chatml_dir(path: Path) -> Path:
    return tokenizer_dir(path, QWEN2, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def llama3_dir(path: Path) -> Path:
    # A list of named templates (the default is used) and the BOS as an AddedToken dict.
    return tokenizer_dir(path, [{"name": "default", "template": LLAMA3},
                                {"name": "tool_use", "template": "{{ 'tools!' }}"}],
                         bos_token={"__type": "AddedToken", "content": "<|begin_of_text|>",
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "single_word": False},
                         eos_token="<|eot_id|>")


def jinja_dir(path: Path) -> Path:
    # chat_template.jinja wins over tokenizer_config.json's entry (as in transformers).
    return tokenizer_dir(path, "{{ 'not this one' }}", jinja=QWEN2, eos_token="<|im_end|>")


def chat_file(path: Path, chats=CHATS) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def learned_runs(tok, tokens: np.ndarray, weights: np.ndarray) -> list[str]:
    """The text of each maximal run of tokens with loss, special tokens included."""
    runs, run = [], []
    for t, w in zip(tokens.tolist(), weights.tolist()):
        if w > 0:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tok.tok.decode(r, skip_special_tokens=False) for r in runs]


def docs_of(tok_file: Path, chats=CHATS):
    tok = load_tokenizer(str(tok_file))
    template = find_chat_template(tok)
    assert template is not None
    docs = tokenize_records([Chat(tuple(c), f"chat {i}") for i, c in enumerate(chats)], tok,
                            template)
    offs = docs.offsets[0]
    return tok, template, [(docs.tokens[0][a:b], docs.weights[0][a:b])
                           for a, b in zip(offs[:-1], offs[1:])]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"chatml": chatml_dir(root / "chatml"), "llama3": llama3_dir(root / "llama3"),
            "jinja": jinja_dir(root / "jinja")}


@pytest.fixture(scope="module")
def transformers_renders(tok_dirs, tmp_path_factory):
    """transformers' text and ids of every (tokenizer dir, chat, generation prompt) case:
    whole chats without, and each chat's prefix before its last turn with, the prompt."""
    work = tmp_path_factory.mktemp("hfchat")
    cases = [{"dir": str(f.parent), "messages": m, "add_generation_prompt": g, "name": name}
             for name, f in tok_dirs.items() for c in CHATS
             for m, g in ((c, False), (c[:-1], True))]
    (work / "cases.json").write_text(json.dumps(cases))
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "chat", str(work / "cases.json"),
                    str(work / "out.json")], check=True, capture_output=True, text=True,
                   timeout=600)
    return cases, json.loads((work / "out.json").read_text())


@needs_hf
def test_rendered_text_and_tokens_match_transformers(tok_dirs, transformers_renders):
    cases, ref = transformers_renders
    assert len(ref) == len(cases) == 18
    for case, want in zip(cases, ref):
        tok = load_tokenizer(str(Path(case["dir"]) / "tokenizer.json"))
        template = find_chat_template(tok)
        got = template.render(case["messages"], case["add_generation_prompt"], "test")
        assert got == want["text"], (case, got, want["text"])
        if not case["add_generation_prompt"]:
            # Our tokens (each turn tokenized apart) are transformers' tokens of the text.
            docs = tokenize_records([Chat(tuple(case["messages"]), "t")], tok, template)
            assert docs.tokens[0].tolist() == want["ids"], case
    # The templates did what they are known for (not a vacuous match).
    texts = {(c["name"], c["add_generation_prompt"]): r["text"] for c, r in zip(cases, ref)}
    assert texts["chatml", False].startswith("<|im_start|>system\nYou are Qwen")
    assert texts["llama3", True].startswith("<|begin_of_text|><|start_header_id|>user")
    assert texts["jinja", False] == texts["chatml", False]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_loss_covers_exactly_each_assistant_turn(tok_dirs, name):
    tok, _, docs = docs_of(tok_dirs[name])
    for (tokens, weights), turns in zip(docs, TURNS[name]):
        assert learned_runs(tok, tokens, weights) == turns
    # One BOS where the template writes one (Llama-3), none where it does not (ChatML).
    firsts = [tok.tok.id_to_token(int(t[0])) for t, _ in docs]
    bos = tok.tok.token_to_id("<|begin_of_text|>")
    if name == "llama3":
        assert firsts == ["<|begin_of_text|>"] * 3
        assert all(int((t == bos).sum()) == 1 for t, _ in docs)
    else:
        assert firsts == ["<|im_start|>"] * 3 and all(bos not in t for t, _ in docs)
    # ...and nothing appended after the template's end of turn.
    assert all(tok.tok.id_to_token(int(t[-1])) in ("<|eot_id|>", "Ċ") for t, _ in docs)


def test_packed_rows_carry_the_template_mask(tok_dirs, tmp_path):
    """Through the pipeline (data.format=instruction, the template beside data.tokenizer):
    each row's learned targets are the assistant turns of its chats, every one of them."""
    chats = CHATS * 4  # 12 records; validation holds out every 4th
    cfg = DataConfig(corpus=str(chat_file(tmp_path / "chats.jsonl", chats)),
                     format="instruction", tokenizer=str(tok_dirs["chatml"]), seq_len=256,
                     validation_fraction=0.25)
    tok = load_tokenizer(cfg.tokenizer)
    rows = packed_rows(cfg, tok, "train")
    learned = []
    for r in range(len(rows)):
        row = rows[r]
        for seg in set(row["segment_ids"].tolist()) - {0}:
            at = row["segment_ids"] == seg
            learned += learned_runs(tok, row["targets"][at], row["loss_mask"][at])
    want = [t for i in range(len(chats)) if i % 4 != 3 for t in TURNS["chatml"][i % 3]]
    assert sorted(learned) == sorted(want)


def test_without_a_template_chats_stay_role_tagged(tmp_path):
    """A tokenizer.json without tokenizer_config.json / chat_template.jinja: role-tagged
    lines, loss on the last assistant message and EOS, as before."""
    tok_file = tokenizer_dir(tmp_path / "plain", None)
    (tmp_path / "plain" / "tokenizer_config.json").unlink()
    tok = load_tokenizer(str(tok_file))
    assert find_chat_template(tok) is None
    cfg = DataConfig(corpus=str(chat_file(tmp_path / "c.jsonl", CHATS[1:] * 2)),
                     format="instruction", tokenizer=str(tok_file), seq_len=256,
                     validation_fraction=0.5)
    rows = packed_rows(cfg, tok, "train")  # the two copies of CHATS[1]
    row = rows[0]
    at = row["segment_ids"] == 1
    text = tok.tok.decode(row["inputs"][at].tolist(), skip_special_tokens=False)
    assert text == ("<|begin_of_text|>system: Answer briefly.\nuser: Name a colour.\nassistant: "
                    "Blue.\nuser: Another one?\nassistant: Green, or café ☕ brown.  ")
    assert learned_runs(tok, row["targets"][at], row["loss_mask"][at]) == [
        "Green, or café ☕ brown.  <|end_of_text|>"]  # the last turn and its EOS


def test_import_hf_carries_the_template_to_init_from(tmp_path):
    """`lm import hf` of a directory with chat_template.jinja and tokenizer_config.json:
    both land beside the run's tokenizer, and an instruction fine-tune --init-from the
    imported run (or the HF dir itself) renders chats with that template."""
    from lm.config import TrainConfig
    from lm.interop.hf_import import import_hf
    from lm.train.param_source import with_source_model
    vocab = byte_bpe().get_vocab_size() + 8  # an embedding padded past the tokenizer
    # config.json's ids are the tokenizer's (jinja_dir's eos_token <|im_end|>; no BOS, no
    # pad, as Qwen2 ships): an import whose tokenizer contradicts them is refused.
    ids = {"bos_token_id": None, "pad_token_id": None,
           "eos_token_id": SPECIALS.index("<|im_end|>")}
    hf_dir, _ = write_hf_dir(tmp_path / "hf", ids, vocab_size=vocab, max_seq_len=256)
    jinja_dir(tmp_path / "hf")  # replaces the tokenizer, adds the template files
    assert import_hf(hf_dir, tmp_path / "run") == 0
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "run" / f).read_bytes() == (hf_dir / f).read_bytes()
    data = chat_file(tmp_path / "chats.jsonl", CHATS * 2)
    for source in (tmp_path / "run", hf_dir):
        base = dataclasses.replace(TrainConfig(), init_from=str(source), data=DataConfig(
            corpus=str(data), format="instruction", seq_len=256, validation_fraction=0.5))
        cfg = with_source_model(base, [])
        assert Path(cfg.data.tokenizer) == (source / "tokenizer.json").absolute()
        tok = load_tokenizer(cfg.data.tokenizer)
        rows = packed_rows(cfg.data, tok, "train")
        row = rows[0]
        at = row["segment_ids"] == 1
        text = tok.tok.decode(row["inputs"][at].tolist(), skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\n"), text
        assert learned_runs(tok, row["targets"][at], row["loss_mask"][at]) in TURNS["chatml"]


NOT_PREFIX_STABLE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                     "{% if m.role == 'assistant' and not loop.last %}(elided){% else %}"
                     "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template,chats,message", [
    ("{{ raise_exception('system messages are not supported') }}", CHATS,
     "line 1: the chat template of"),
    ("{% for m in messages %}{{ m.content }}", CHATS, "does not parse"),
    (NOT_PREFIX_STABLE, CHATS[2:] * 2, "is not prefix-stable"),
    (QWEN2, [[{"role": "user"}, {"role": "assistant", "content": "x"}]] * 2,
     "'messages' must be a list of {role, content}"),
    (QWEN2, [[{"role": "user", "content": "x"}, {"content": "y"}]] * 2,
     "'messages' must be a list of {role, content}"),
    ([{"name": "tool_use", "template": "x"}], CHATS, "no 'default' template"),
])
def test_bad_templates_and_chats_are_one_line_exit_2(lm_here, tmp_path, template, chats,
                                                     message):
    tok_file = tokenizer_dir(tmp_path / "tok", template, eos_token="<|im_end|>")
    data = chat_file(tmp_path / "chats.jsonl", chats)
    assert_train_refused(lm_here, tmp_path / "run", [
        f"data.corpus={data}", "data.format=instruction", f"data.tokenizer={tok_file}",
        "data.validation_fraction=0.5"], message)


# ------------------------------------------------- lm sample --chat: the reply

CHAT = {"system": "Answer briefly.", "user": "Name a colour."}
# (template, tokenizer_config.json's tokens, config.json's ids, end-of-turn token, seed):
# the EOS is the base model's (<|endoftext|>, <|end_of_text|>), not the template's end of
# turn, as Qwen2.5 and Llama-3 base tokenizers ship: the reply must end at the turn's end.
CHAT_CASES = {
    "chatml": (QWEN2, dict(eos_token="<|endoftext|>"),
               dict(bos_token_id=None, eos_token_id=0, pad_token_id=None), "<|im_end|>", 5),
    "llama3": (LLAMA3, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
               dict(bos_token_id=3, eos_token_id=4, pad_token_id=None), "<|eot_id|>", 6),
}


@needs_hf
def test_chat_sample_is_transformers_reply(tmp_path):
    """`lm sample --chat MESSAGE --system TEXT --temperature 0` on an imported model prints
    exactly the reply of transformers' apply_chat_template(add_generation_prompt=True) +
    generate(do_sample=False), for a ChatML and a Llama-3 template: the same prompt ids
    (the template's BOS, no framing around it), the reply ending at the template's
    end-of-turn token although the model's EOS is another token."""
    from lm.cli import main
    cases = []
    for name, (template, tokens, ids, eot, seed) in CHAT_CASES.items():
        tokenizer_dir(tmp_path / name, template, **tokens)
        cases.append({"dir": str(tmp_path / name), "end_of_turn": eot, "ids": ids,
                      "seed": seed, "messages": [{"role": "system", "content": CHAT["system"]},
                                                 {"role": "user", "content": CHAT["user"]}]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "chatgen",
                    str(tmp_path / "cases.json")], check=True, capture_output=True, text=True,
                   timeout=600)
    for name in CHAT_CASES:
        ref = json.loads((tmp_path / name / "reply.json").read_text())
        assert len(ref["new_ids"]) < 24  # it stopped at the end of turn
        run = tmp_path / f"{name}-run"
        assert main(["import", "hf", str(tmp_path / name), "--run-dir", str(run)]) == 0
        got = subprocess.run(
            [sys.executable, "-m", "lm.cli", "sample", "--run", str(run), "--chat",
             CHAT["user"], "--system", CHAT["system"], "--temperature", "0",
             "--max-new-tokens", "24"], capture_output=True, text=True, timeout=600)
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout == ref["text"] + "\n", (name, got.stdout, ref)


def test_chat_without_a_template_is_one_line_exit_2(tmp_path, lm_here):
    from lm.interop.hf_import import import_hf
    hf_dir, _ = write_hf_dir(tmp_path / "hf")  # a tokenizer.json and nothing beside it
    assert import_hf(hf_dir, tmp_path / "run") == 0
    result = lm_here("sample", "--run", str(tmp_path / "run"), "--chat", "hi")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no chat template" in lines[0], lines
