"""The Hugging Face side of the interop tests (tests/test_interop_hf.py). Runs in its own
Python 3.11 environment with torch + transformers (LMLAB_HF_PYTHON; .ci/run makes it):
lmlab's Python never imports torch. Files are the interface: safetensors directories
written by transformers' save_pretrained, tokens and logits as .npy.

  python hf_reference.py make OUT          tiny RANDOM models of each family, each in
                                           OUT/<family>/ with its logits (logits.npy) on
                                           OUT/tokens.npy; nothing is downloaded
  python hf_reference.py logits TOKENS DIR...   load each DIR with transformers and
                                           write DIR/logits_hf.npy
  python hf_reference.py peft TOKENS ADAPTER...   each PEFT adapter dir loaded onto its
                                           base (adapter_config.json names it) with
                                           peft.PeftModel: ADAPTER/logits_peft.npy
  python hf_reference.py chat CASES OUT    each case of CASES (JSON: [{dir, messages,
                                           add_generation_prompt}]) through AutoTokenizer's
                                           apply_chat_template: OUT gets [{text, ids}]
  python hf_reference.py saved OUT         model directories as transformers saves them
                                           (tokenizer_config.json, generation_config.json,
                                           metadata fields), OUT/<case>/, each with
                                           generate.json: transformers' greedy continuation
                                           of PROMPT as text
  python hf_reference.py chatgen CASES     each case of CASES (JSON: [{dir, messages,
                                           end_of_turn, ids, seed}]; dir holds a
                                           tokenizer with a chat template): a tiny Llama
                                           saved there, and reply.json: transformers'
                                           apply_chat_template + greedy generate's reply
  python hf_reference.py gguf OUT          tiny random models written as GGUF files with
                                           the gguf package (OUT/<case>.gguf, each tensor
                                           type quantized by its own quantizers), loaded by
                                           transformers (from_pretrained(gguf_file=)):
                                           OUT/<case>.json, its logits and token ids
  python hf_reference.py harness OUT       two `saved` cases, three tiny harness tasks
                                           (OUT/tasks/) and lm-evaluation-harness's `hf`
                                           backend's results: OUT/<case>/harness.json
  python hf_reference.py loss ROWS DIR     DIR's model's mean token loss on lmlab's
                                           packed eval rows (ROWS .npz), each document
                                           alone: {"loss", "tokens"} on stdout
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 96  # the models' vocabulary (the tokenizer uses fewer ids: an unused tail)
SEQ = 24
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
        "resolved. First Citizen: First, you know Caius Marcius is chief enemy to the people.")

# Odd shapes on purpose: GQA 6:2, head_dim 12 (not a power of two, not d_model / heads),
# rope theta 5e5, untied and tied embeddings, a sliding window, qkv biases, qk-norm, MoE
# with and without renormalised gates and with a dense layer among the sparse ones.
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=12,
              max_position_embeddings=64, rope_theta=5e5, bos_token_id=0, eos_token_id=1,
              pad_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=True, sliding_window=8,
                                                 rms_norm_eps=1e-6)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "mixtral": (transformers.MixtralConfig, dict(tie_word_embeddings=False, num_local_experts=4,
                                                 num_experts_per_tok=2, rms_norm_eps=1e-5)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=40, norm_topk_prob=False, mlp_only_layers=[1],
        rms_norm_eps=1e-6)),
    # RoPE scaling (transformers' rope_parameters): Llama-3's, and YaRN on qk-norm Qwen3.
    "llama-rope-llama3": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters=dict(
            rope_type="llama3", rope_theta=5e5, factor=4.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen3-rope-yarn": (transformers.Qwen3Config, dict(
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters=dict(
            rope_type="yarn", rope_theta=5e5, factor=4.0, beta_fast=32.0, beta_slow=1.0,
            original_max_position_embeddings=16))),
    # RoPE on interleaved channel pairs; o_proj square (head_dim = hidden / heads).
    "helium": (transformers.HeliumConfig, dict(tie_word_embeddings=False, rms_norm_eps=1e-6,
                                               head_dim=8)),
    # Fused qkv_proj and gate_up_proj, a sliding window.
    "phi3": (transformers.Phi3Config, dict(tie_word_embeddings=False, rms_norm_eps=1e-5,
                                           sliding_window=8)),
    # Norms on the sublayers' outputs only; qk-norm over all heads at once.
    "olmo2": (transformers.Olmo2Config, dict(tie_word_embeddings=False, rms_norm_eps=1e-6)),
    # Peri norms of (1 + weight), sqrt(d) embeddings (tied), GeGLU, query_pre_attn_scalar,
    # attention and final soft-caps that bind, sliding and global layers alternating.
    "gemma2": (transformers.Gemma2Config, dict(
        tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=8,
        query_pre_attn_scalar=20, attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    # Gemma 2 + per-head qk-norm, two local layers to a global one, the local layers'
    # own RoPE base and the global layers' linear RoPE scaling; no soft-caps.
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        tie_word_embeddings=False, rms_norm_eps=1e-6, sliding_window=8, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=5e5),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
}
# The model class of a config class, where it is not its name with ForCausalLM.
MODEL_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}


def model_class(cls):
    name = cls.__name__
    return getattr(transformers, MODEL_CLASSES.get(name, name.replace("Config", "ForCausalLM")))
SHARDED = "llama"  # saved in several shards with a model.safetensors.index.json


def tokenizer() -> Tokenizer:
    """A small BPE tokenizer trained on TEXT, with <s> </s> <pad> at ids 0-2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and O(1)-scaled (HF's init leaves biases 0 and norm weights
    1, which would not test their mapping; std 0.02 would make every logit near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                std = 1.0 if "embed" in name else 1 / math.sqrt(fan_in)
                p.copy_(std * torch.randn(p.shape, generator=g))


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ)).astype(np.int32)
    np.save(out / "tokens.npy", tokens)
    tok = tokenizer()
    for i, (family, (cls, extra)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        cfg = cls(**{**COMMON, **extra}, attn_implementation="eager")
        model = model_class(cls)(cfg)
        randomise(model, i)
        model.eval()
        d = out / family
        model.save_pretrained(d, max_shard_size="40KB" if family == SHARDED else "1GB")
        tok.save(str(d / "tokenizer.json"))
        np.save(d / "logits.npy", logits_of(model, tokens))
    print(json.dumps({"families": list(FAMILIES), "transformers": transformers.__version__,
                      "torch": torch.__version__}))


def reload_logits(tokens_path: Path, dirs: list[Path]) -> None:
    tokens = np.load(tokens_path)
    for d in dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        np.save(d / "logits_hf.npy", logits_of(model, tokens))


def peft_logits(tokens_path: Path, adapters: list[Path]) -> None:
    import peft
    tokens = np.load(tokens_path)
    for d in adapters:
        base_dir = json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = transformers.AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, attn_implementation="eager")
        model = peft.PeftModel.from_pretrained(base, d)
        model.eval()
        np.save(d / "logits_peft.npy", logits_of(model, tokens))


def chat(cases_path: Path, out: Path) -> None:
    result = []
    for case in json.loads(cases_path.read_text()):
        tok = transformers.AutoTokenizer.from_pretrained(case["dir"])
        kw = dict(add_generation_prompt=case["add_generation_prompt"])
        text = tok.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kw)
        result.append({"text": text, "ids": [int(i) for i in ids]})
    out.write_text(json.dumps(result))


PROMPT = "First Citizen: you are all resolved"
NEW_TOKENS = 24  # prompt + continuation < max_position_embeddings (no RoPE extrapolation)
# Directories as transformers saves real checkpoints: (model family, what
# tokenizer_config.json says, config.json's fields on top of COMMON, the weights' seed:
# one whose greedy text does not settle into repeating a token). "llama-bos":
# Llama-2/3 style, a Metaspace BPE whose TemplateProcessing puts <s> first, the pad token
# is the EOS token, generation_config.json lists a second end-of-sequence id.
# "qwen2-plain": Qwen's byte-level BPE (the pipeline transformers' Qwen2Tokenizer builds),
# no BOS token, no pad token of its own, no post-processor.
BOS_NAMES = dict(bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
BOS_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, unk_token_id=3)
SAVED = {
    "llama-bos": ("llama", BOS_NAMES, BOS_IDS, 100),
    # The families after Llama's lineage, through lm sample's KV cache (Gemma: local and
    # global layers, soft-caps; OLMo 2: output norms, qk-norm over all heads), with
    # llama-bos's tokenizer.
    "phi3-bos": ("phi3", BOS_NAMES, BOS_IDS, 100),
    "olmo2-bos": ("olmo2", BOS_NAMES, BOS_IDS, 101),
    "gemma2-bos": ("gemma2", BOS_NAMES, dict(BOS_IDS, tie_word_embeddings=False),
                   102),  # tied random ones repeat a token
    "gemma3-bos": ("gemma3_text", BOS_NAMES, BOS_IDS, 100),
    "qwen2-plain": ("qwen2", dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
                    dict(bos_token_id=None, eos_token_id=0, pad_token_id=0, vocab_size=320,
                         tie_word_embeddings=False), 107),  # tied random ones repeat
}


def qwen2_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on TEXT with transformers' Qwen2Tokenizer pipeline (NFC,
    Qwen's split regex, ByteLevel), which AutoTokenizer rebuilds for a qwen2 model."""
    backend = transformers.Qwen2Tokenizer()._tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = (
        backend.normalizer, backend.pre_tokenizer, backend.decoder)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def greedy(d: Path) -> dict:
    """transformers' greedy continuation of PROMPT by the directory's model, as lm sample
    prints it: the prompt, then the new tokens decoded (special tokens skipped), the
    end-of-sequence token generate stopped at left out."""
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    if new and new[-1] in stops:
        new = new[:-1]
    return {"prompt": PROMPT, "prompt_ids": enc["input_ids"][0].tolist(), "new_ids": new,
            "text": PROMPT + tok.decode(new, skip_special_tokens=True)}


def row_loss(rows_path: Path, d: Path) -> None:
    """The mean token loss of DIR's model on packed rows (ROWS: an .npz of lmlab's eval
    rows: inputs, targets, segment_ids, loss_mask), each document of a row run alone
    from its first token (what lmlab's segment masking and per-document positions
    compute): prints {"loss", "tokens"}."""
    rows = np.load(rows_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager").eval()
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for inp, tgt, seg, mask in zip(rows["inputs"], rows["targets"], rows["segment_ids"],
                                       rows["loss_mask"]):
            for s in np.unique(seg[mask > 0]):
                at = np.flatnonzero(seg == s)
                logits = model(torch.as_tensor(inp[at][None], dtype=torch.long)).logits[0]
                lp = torch.log_softmax(logits.double(), -1)
                tok_nll = -lp[torch.arange(len(at)), torch.as_tensor(tgt[at], dtype=torch.long)]
                m = torch.as_tensor(mask[at], dtype=torch.float64)
                nll += float((tok_nll * m).sum())
                count += float(m.sum())
    print(json.dumps({"loss": nll / count, "tokens": count}))


def save_case(case: str, d: Path) -> None:
    """SAVED[case] written to d as transformers saves it, with generate.json."""
    from tokenizers import processors
    family, names, fields, seed = SAVED[case]
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cls(**{**COMMON, **extra, **fields}, attn_implementation="eager")
    model = model_class(cls)(cfg)
    randomise(model, seed)
    model.eval()
    model.save_pretrained(d)
    tok = qwen2_tokenizer() if family == "qwen2" else tokenizer()
    if family != "qwen2":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config["_model_name_or_path"] = f"converted/{case}"  # as a GGUF conversion writes
    (d / "config.json").write_text(json.dumps(config, indent=2))
    if case == "llama-bos":
        # A second end-of-sequence id (as Llama-3's <|eot_id|>): a token the model
        # emits mid-continuation, so generate stops there.
        first = greedy(d)["new_ids"]
        stop = next(t for t in first[6:] if t not in first[:6] and t != 1)
        generation = json.loads((d / "generation_config.json").read_text())
        generation["eos_token_id"] = [1, stop]
        (d / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (d / "generate.json").write_text(json.dumps(greedy(d)))


def saved(out: Path) -> None:
    for case in SAVED:
        save_case(case, out / case)
    print(json.dumps({"saved": list(SAVED)}))


# lm-evaluation-harness tasks over TEXT's words (tests/e2e/test_harness.py): one of each
# request type. Multiple choice: a context and four continuations, the gold one the text's
# own; rolling: passages longer than the models' 64 positions (several windows);
# generation: short contexts continued greedily until a stop string or 12 tokens.
HARNESS_CASES = ["llama-bos", "qwen2-plain"]
HARNESS_TASKS = {
    "tiny_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "tiny_generate": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: [".", "?"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def harness_tasks(out: Path) -> Path:
    """HARNESS_TASKS as a folder of harness YAML tasks with their JSONL data (absolute
    paths: both sides read the same files)."""
    rng = np.random.default_rng(0)
    words = TEXT.split()
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"tiny_choice": [], "tiny_rolling": [], "tiny_generate": []}
    for i in range(24):
        at = int(rng.integers(0, len(words) - 12))
        n = int(rng.integers(3, 8))
        choices = [" " + " ".join(words[at + n:at + n + 3])]
        while len(choices) < 4:
            j = int(rng.integers(0, len(words) - 3))
            c = " " + " ".join(words[j:j + 3])
            if c not in choices:
                choices.append(c)
        gold = int(rng.integers(0, 4))
        choices[0], choices[gold] = choices[gold], choices[0]
        context = " ".join(words[at:at + n])
        rows["tiny_choice"].append({"context": context, "choices": choices, "gold": gold})
        rows["tiny_generate"].append({"context": context, "answer": choices[gold]})
    for i in range(4):
        start = int(rng.integers(0, len(words) // 2))
        rows["tiny_rolling"].append({"text": " ".join((words * 3)[start:start + 40 + 10 * i])})
    for task, body in HARNESS_TASKS.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[task]))
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n" + body)
    return folder


def harness(out: Path) -> None:
    """HARNESS_CASES saved under OUT/<case>/, HARNESS_TASKS under OUT/tasks/, and the
    harness's own `hf` backend's results on them (OUT/<case>/harness.json: per task, the
    metrics and each document's responses), offline."""
    import os
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    folder = harness_tasks(out)
    manager = TaskManager(include_path=str(folder))
    for case in HARNESS_CASES:
        save_case(case, out / case)
        res = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(out / case), "dtype": "float32"},
            tasks=list(HARNESS_TASKS), task_manager=manager, batch_size=4, device="cpu",
            log_samples=True, bootstrap_iters=0)
        body = {"results": res["results"],
                "samples": {t: [{"doc_id": s["doc_id"], "resps": s["filtered_resps"]}
                                for s in samples] for t, samples in res["samples"].items()}}
        (out / case / "harness.json").write_text(json.dumps(body, default=str))
    print(json.dumps({"harness": HARNESS_CASES, "lm_eval": lm_eval.__version__}))


CHAT_NEW_TOKENS = 24


def chat_reply(model, tok, messages, stops) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             do_sample=False, max_new_tokens=CHAT_NEW_TOKENS,
                             eos_token_id=stops, pad_token_id=stops[-1])
    return out[0, len(ids):].tolist()


def chatgen(cases_path: Path) -> None:
    """A random Llama per case whose greedy reply ends at the template's end-of-turn
    token mid-reply (a random model would rarely emit it: its lm_head row is made a
    scaled copy of the row of a token the reply emits), as a chat model does;
    reply.json holds the reply transformers decodes (end of turn and specials left out)."""
    for case in json.loads(cases_path.read_text()):
        d = Path(case["dir"])
        tok = transformers.AutoTokenizer.from_pretrained(d)
        torch.manual_seed(case["seed"])
        cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok),
                                          "max_position_embeddings": 256, **case["ids"]},
                                       tie_word_embeddings=False, rms_norm_eps=1e-5,
                                       attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
        randomise(model, case["seed"])
        model.eval()
        eot = tok.convert_tokens_to_ids(case["end_of_turn"])
        eos = case["ids"]["eos_token_id"]
        stops = [eot, eos]
        first = chat_reply(model, tok, case["messages"], stops)
        row = model.lm_head.weight.data
        for k in range(3, len(first)):
            if eot in first[:k] or first[k] in first[:k] or first[k] in stops:
                continue
            with torch.no_grad():
                row[eot] = 1.5 * row[first[k]]
            new = chat_reply(model, tok, case["messages"], stops)
            if 2 <= len(new) < CHAT_NEW_TOKENS and new[-1] == eot:
                break
        else:
            raise SystemExit(f"{d}: no reply ending at {case['end_of_turn']}")
        model.save_pretrained(d)
        (d / "reply.json").write_text(json.dumps({
            "new_ids": new, "text": tok.decode(new[:-1], skip_special_tokens=True)}))
    print(json.dumps({"chatgen": len(json.loads(cases_path.read_text()))}))


# GGUF files: (family, tokenizer kind, tensor type of the matrices). K-quants, which the
# gguf package decodes but cannot quantize, are random blocks (scales kept finite).
# "mistral": llama.cpp writes Mistral as architecture "llama" with a SentencePiece
# vocabulary; qwen3 has qk-norm and transformers' default head_dim (128).
GGUF_CASES = {
    "llama-f32": ("llama", "gpt2", "F32"), "llama-f16": ("llama", "gpt2", "F16"),
    "llama-bf16": ("llama", "gpt2", "BF16"), "llama-q8_0": ("llama", "gpt2", "Q8_0"),
    "llama-q4_0": ("llama", "gpt2", "Q4_0"), "llama-q4_1": ("llama", "gpt2", "Q4_1"),
    "llama-q5_0": ("llama", "gpt2", "Q5_0"), "llama-q5_1": ("llama", "gpt2", "Q5_1"),
    "llama-q2_k": ("llama", "gpt2", "Q2_K"), "llama-q3_k": ("llama", "gpt2", "Q3_K"),
    "llama-q4_k": ("llama", "gpt2", "Q4_K"), "llama-q5_k": ("llama", "gpt2", "Q5_K"),
    "llama-q6_k": ("llama", "gpt2", "Q6_K"),
    "mistral-q4_0": ("mistral", "llama", "Q4_0"), "qwen2-q8_0": ("qwen2", "gpt2", "Q8_0"),
    "qwen3-q8_0": ("qwen3", "gpt2", "Q8_0"), "llama-spm-f16": ("llama", "llama", "F16"),
}
GGUF_DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=64, rope_theta=5e5, rms_norm_eps=1e-5)
GGUF_CHAT = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": "Name a colour."}]


def _gguf_tokenizer(kind: str) -> dict:
    """The metadata of a tokenizer as llama.cpp writes it: byte-level BPE with Llama-3's
    split and BOS ("gpt2"), or SentencePiece-style pieces with scores and no merges
    ("llama")."""
    if kind == "gpt2":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                    "<|start_header_id|>", "<|end_header_id|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([TEXT, json.dumps(GGUF_CHAT)], trainer)
        model = json.loads(tok.to_str())["model"]
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        template = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
                    "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}"
                    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
        return dict(model="gpt2", pre="llama-bpe", tokens=tokens, merges=merges,
                    types=[3 if t in specials else 1 for t in tokens], bos=0, eos=1,
                    add_bos=True, template=template)
    tok = tokenizer()  # Metaspace pieces; <s> </s> <pad> <unk> at 0-3
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return dict(model="llama", tokens=tokens, scores=[-float(i) for i in range(len(tokens))],
                types=[3 if i < 4 else 1 for i in range(len(tokens))], bos=0, eos=1, unk=3,
                template=None)


# Where each K-quant block keeps its f16 scale d (and min dmin), and values that keep the
# weights O(0.1) (llama.cpp's block layouts, ggml-common.h).
K_SCALES = {"Q2_K": ((80, 2e-3), (82, 1e-3)), "Q3_K": ((108, 1e-3),),
            "Q4_K": ((0, 2e-4), (2, 1e-4)), "Q5_K": ((0, 1e-4), (2, 5e-5)),
            "Q6_K": ((208, 5e-5),)}


def _k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random blocks of a K-quant type with finite, small f16 scales."""
    import gguf
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // size, nbytes), dtype=np.uint8)
    for at, value in K_SCALES[qtype.name]:
        blocks[..., at:at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def gguf_files(out: Path) -> None:
    import gguf
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, (case, (family, kind, qname)) in enumerate(GGUF_CASES.items()):
        meta = _gguf_tokenizer(kind)
        vocab = len(meta["tokens"])
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.LlamaConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        dims = dict(GGUF_DIMS, **(dict(num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=128) if family == "qwen3" else {}))
        cfg = cls(**dims, vocab_size=vocab, tie_word_embeddings=family == "qwen2",
                  bos_token_id=meta["bos"], eos_token_id=meta["eos"],
                  attn_implementation="eager")
        torch.manual_seed(n)
        model = model_class(cls)(cfg)
        randomise(model, n)
        arch = "llama" if family == "mistral" else family
        w = gguf.GGUFWriter(str(out / f"{case}.gguf"), arch)
        # (transformers 5.24 would load a "llama" file named exactly "mistral" as Mistral,
        # which fails with gguf 0.19; real files carry longer names and load as Llama)
        w.add_name("Mistral-7B-tiny" if family == "mistral" else f"tiny-{case}")
        w.add_context_length(GGUF_DIMS["max_position_embeddings"])
        w.add_embedding_length(GGUF_DIMS["hidden_size"])
        w.add_block_count(GGUF_DIMS["num_hidden_layers"])
        w.add_feed_forward_length(GGUF_DIMS["intermediate_size"])
        w.add_head_count(dims["num_attention_heads"])
        w.add_head_count_kv(dims["num_key_value_heads"])
        w.add_rope_freq_base(GGUF_DIMS["rope_theta"])
        w.add_layer_norm_rms_eps(GGUF_DIMS["rms_norm_eps"])
        if arch == "llama":
            w.add_rope_dimension_count(dims["head_dim"])
        if family == "qwen3":
            w.add_key_length(dims["head_dim"])
            w.add_value_length(dims["head_dim"])
        w.add_tokenizer_model(meta["model"])
        if "pre" in meta:
            w.add_tokenizer_pre(meta["pre"])
        w.add_token_list(meta["tokens"])
        w.add_token_types(meta["types"])
        if "merges" in meta:
            w.add_token_merges(meta["merges"])
        if "scores" in meta:
            w.add_token_scores(meta["scores"])
        w.add_bos_token_id(meta["bos"])
        w.add_eos_token_id(meta["eos"])
        if "unk" in meta:
            w.add_unk_token_id(meta["unk"])
        if "add_bos" in meta:
            w.add_add_bos_token(meta["add_bos"])
        if meta["template"]:
            w.add_chat_template(meta["template"])
        qtype = gguf.GGMLQuantizationType[qname]
        heads = {"q": dims["num_attention_heads"], "k": dims["num_key_value_heads"]}
        names = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
        layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm"}
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name in names:
                gname = names[name]
            else:
                i, rest = name.split(".", 3)[2], name.split(".", 3)[3]
                module, kindw = rest.rsplit(".", 1)
                gname = f"blk.{i}.{layer[module]}.{kindw}"
            t = p.float().numpy()
            if arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k"):
                h = heads[gname.split(".")[-2][-1]]  # llama.cpp's permute
                t = t.reshape(h, 2, -1, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
            if t.ndim == 1 or qname == "F32":
                w.add_tensor(gname, np.ascontiguousarray(t, np.float32))
            elif qname == "F16":
                w.add_tensor(gname, t.astype(np.float16))
            elif qname in K_SCALES:
                w.add_tensor(gname, _k_blocks(*t.shape, qtype, rng), raw_dtype=qtype)
            else:
                w.add_tensor(gname, gguf.quantize(t, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, gguf_file=f"{case}.gguf", dtype=torch.float32, attn_implementation="eager")
        loaded.eval()
        assert loaded.config.model_type == arch, (case, loaded.config.model_type)
        tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=f"{case}.gguf")
        tokens = np.random.default_rng(n).integers(0, vocab, size=(2, SEQ)).astype(np.int32)
        np.save(out / f"{case}.tokens.npy", tokens)
        np.save(out / f"{case}.logits.npy", logits_of(loaded, tokens))
        ref = {"vocab": vocab, "text": TEXT, "ids": tok(TEXT)["input_ids"],
               "decoded": tok.decode(tok(TEXT)["input_ids"], skip_special_tokens=True)}
        if meta["template"]:
            ref["chat_ids"] = tok.apply_chat_template(GGUF_CHAT, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
            ref["chat"] = GGUF_CHAT
        (out / f"{case}.json").write_text(json.dumps(ref))
    print(json.dumps({"gguf": list(GGUF_CASES)}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "logits":
        reload_logits(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    elif sys.argv[1] == "peft":
        peft_logits(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
    elif sys.argv[1] == "chat":
        chat(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "saved":
        saved(Path(sys.argv[2]))
    elif sys.argv[1] == "chatgen":
        chatgen(Path(sys.argv[2]))
    elif sys.argv[1] == "loss":
        row_loss(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "harness":
        harness(Path(sys.argv[2]))
    elif sys.argv[1] == "gguf":
        gguf_files(Path(sys.argv[2]))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
