"""The tokenizer a GGUF file describes, as the Hugging Face files `lm import gguf` puts in
a run dir: tokenizer.json (the `tokenizers` pipeline) and tokenizer_config.json (the chat
template and the special tokens).

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`,
with `token_type`, `scores`, `merges`), which pipeline it is (`tokenizer.ggml.model`, and
for byte-level BPE the split regex's name `tokenizer.ggml.pre`), the special ids and
`add_bos_token` / `add_eos_token` as metadata. This module rebuilds the pipeline exactly
as transformers' GGUF loader (transformers/integrations/gguf/gguf_tokenizer_mapping.py,
5.24) does, so a GGUF tokenizes the same in lmlab and in transformers (tested):

- "gpt2": byte-level BPE (GPT2Tokenizer's model, pre-tokenizer and decoder), the split
  regex of the named `pre` where transformers knows it (Llama-3's, Qwen2's, ...; other
  names keep GPT-2's);
- "llama": SentencePiece-style BPE (LlamaTokenizer's: byte fallback, Metaspace "first",
  the decoder that strips the prefix space), with the merges of the file or, as
  llama.cpp's SentencePiece conversions store none, the ones the token scores imply
  (transformers' generate_merges);
- tokens typed CONTROL become special added tokens (in a byte-level vocabulary only
  those spelled in the byte alphabet: transformers skips mislabelled ones), USER_DEFINED
  ones plain added tokens; the post-processor adds BOS / EOS as `add_bos_token` /
  `add_eos_token` say ("llama" files without the flag: BOS, as llama.cpp does).

Other tokenizer models (T5's unigram, Gemma's respelled SentencePiece, ...) are refused in
one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm.config import ConfigError

# transformers' GGUF_PRE_TOKENIZER_SPLITS (the regexes of the `pre` names it knows).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
               "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges(meta: dict, vocab: dict[str, int], scores: dict[str, float] | None
            ) -> list[tuple[str, str]]:
    """The file's merges, or those its vocabulary implies (transformers' generate_merges:
    every split of a token into two tokens, ordered by the token's score)."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    reverse = scores is not None
    by = dict(scores) if reverse else vocab
    merges = []
    for token, score in by.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=reverse)
    return [(a, b) for a, b, _ in merges]


def _pipeline(meta: dict, kind: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tokens = meta["tokenizer.ggml.tokens"]
    if kind == "gpt2":
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, vocab, None),
                                   dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None
                             else pre_tokenizers.Sequence([
                                 pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)]))
        tok.decoder = decoders.ByteLevel()
        return tok, alphabet
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = meta.get("tokenizer.ggml.scores")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(
        meta, vocab, None if scores is None else dict(zip(tokens, scores))),
        fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return tok, None


def write_tokenizer(meta: dict, source: str, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of the file's tokenizer (module doc) in
    `out`. `meta`: the file's metadata by key (lm/interop/gguf_import.py)."""
    from tokenizers import AddedToken, processors
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ConfigError(f"lm import gguf: {source} holds no vocabulary "
                          "(tokenizer.ggml.tokens)")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"lm import gguf: {source}'s tokenizer (tokenizer.ggml.model="
                          f"{kind!r}) is not one lmlab rebuilds (byte-level BPE 'gpt2' and "
                          "SentencePiece-style 'llama' are)")
    tokens = meta["tokenizer.ggml.tokens"]
    tok, alphabet = _pipeline(meta, kind)
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    config: dict = {}
    for name, key in SPECIAL_IDS.items():
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if not 0 <= int(i) < len(tokens):
                raise ConfigError(f"lm import gguf: {source}: tokenizer.ggml.{key}={i} is "
                                  f"outside its vocabulary ({len(tokens)} tokens)")
            config[name] = tokens[int(i)]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    add_bos, add_eos = add_bos and "bos_token" in config, add_eos and "eos_token" in config
    frame = [config["bos_token"]] if add_bos else []
    ends = [config["eos_token"]] if add_eos else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join([*(f"{t}:0" for t in frame), "$A:0", *(f"{t}:0" for t in ends)]),
        pair=" ".join([*(f"{t}:0" for t in frame), "$A:0", *(f"{t}:0" for t in ends),
                       *(f"{t}:1" for t in frame), "$B:1", *(f"{t}:1" for t in ends)]),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(frame + ends)])
    tok.save(str(out / "tokenizer.json"))
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    config.update(add_bos_token=add_bos, add_eos_token=add_eos,
                  tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


__all__ = ["write_tokenizer", "PRE_TOKENIZER_SPLITS"]
