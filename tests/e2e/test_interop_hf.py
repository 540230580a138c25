"""`lm import hf` / `lm export hf`.

Equivalence with transformers: tests/hf_reference.py, run once for this module in the
Python 3.11 environment named by LMLAB_HF_PYTHON (torch + transformers; .ci/run makes
it), builds tiny random models of each family and their logits; they are imported and
compared, exported back, reloaded by transformers and compared again (1e-4, float32).
Without that environment those tests skip, saying why. The round trip through lmlab's
own writer and the bad inputs need no torch and always run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.cli import main

HERE = Path(__file__).resolve().parent.parent  # tests/
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "llama-rope-llama3",
            "qwen3-rope-yarn", "helium", "phi3", "olmo2", "gemma2", "gemma3_text"]
TOL = 1e-4


def hf_python() -> str | None:
    exe = os.environ.get("LMLAB_HF_PYTHON", "")
    return exe if exe and Path(exe).is_file() else None


needs_hf = pytest.mark.skipif(
    hf_python() is None,
    reason="no transformers environment: set LMLAB_HF_PYTHON to a Python with torch + "
           "transformers (.ci/run makes one with Python 3.11)")


def logits_of(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(run_dir)
    logits, _ = nnx.merge(run.pieces.graphdef, params)(jnp.asarray(tokens))
    return np.asarray(logits)


def hf_reference(command: str, out: Path, timeout: int = 600) -> Path:
    """`python hf_reference.py COMMAND OUT` in the transformers environment; OUT."""
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), command, str(out)],
                   check=True, capture_output=True, text=True, timeout=timeout)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return hf_reference("make", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def roundtrip(reference, tmp_path_factory):
    """Each family imported, its lmlab logits, exported, and transformers' logits of the
    export (one transformers process for all)."""
    from lm.interop.hf_export import export_hf
    from lm.interop.hf_import import import_hf
    work = tmp_path_factory.mktemp("lm")
    tokens = np.load(reference / "tokens.npy")
    result = {}
    for family in FAMILIES:
        assert import_hf(reference / family, work / family) == 0
        result[family] = {"lm": logits_of(work / family, tokens)}
        assert export_hf(work / family, work / f"{family}-hf") == 0
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "logits",
                    str(reference / "tokens.npy"), *(str(work / f"{f}-hf") for f in FAMILIES)],
                   check=True, capture_output=True, text=True, timeout=600)
    print("\n| family | max abs logit diff, import | after export |\n|---|---|---|")
    for family in FAMILIES:
        ref = np.load(reference / family / "logits.npy")
        r = result[family]
        r["ref"] = ref
        r["exported"] = np.load(work / f"{family}-hf" / "logits_hf.npy")
        r["import_diff"] = float(np.max(np.abs(r["lm"] - ref)))
        r["export_diff"] = float(np.max(np.abs(r["exported"] - ref)))
        print(f"| {family} | {r['import_diff']:.2e} | {r['export_diff']:.2e} |")
    return result


@needs_hf
@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(roundtrip, family):
    r = roundtrip[family]
    assert np.abs(r["ref"]).max() > 1.0  # the logits are not all ~0 (a vacuous match)
    assert r["import_diff"] < TOL, r["import_diff"]


@needs_hf
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_model_loads_in_transformers_with_the_same_logits(roundtrip, family):
    r = roundtrip[family]
    assert r["export_diff"] < TOL, r["export_diff"]
    assert np.max(np.abs(r["exported"] - r["lm"])) < TOL


# ------------------------------------------------------------- without transformers


def tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<s>", "</s>", "<pad>", "<unk>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def write_hf_dir(path: Path, overrides: dict | None = None, shards: int = 1,
                 family: str | None = None, **model_kw):
    """(An HF-format directory written from a random lmlab model by lmlab's own writer:
    config.json, safetensors (optionally sharded with an index), tokenizer.json; the
    model, holding the written weights)."""
    import dataclasses

    from safetensors.numpy import save_file

    from lm.config import ModelConfig
    from lm.interop.families import family_for, hf_config_from_model
    from lm.interop.hf_export import hf_tensors
    from lm.model import Transformer
    base = ModelConfig()
    kw = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=10,
              max_seq_len=64, tie_embeddings=False, rope_theta=5e5)
    kw.update(model_kw)
    cfg = dataclasses.replace(base, **kw, mlp=dataclasses.replace(
        base.mlp, activation="swiglu", ratio=1.75))
    model = Transformer(cfg, nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          params)  # norm scales not all 1
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    family = family or family_for(cfg)
    path.mkdir(parents=True)
    hf = hf_config_from_model(cfg, family, 0, 1, 2)
    hf.update(overrides or {})
    (path / "config.json").write_text(json.dumps(hf))
    tensors = hf_tensors(cfg, family, params)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({n: tensors[n] for n in part}, str(path / file))
            weight_map.update({n: file for n in part})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    tiny_tokenizer(path / "tokenizer.json")
    return path, model


def test_roundtrip_through_lmlab_writer_sharded_keeps_logits(tmp_path):
    """Sharded safetensors with an index -> lm import hf (CLI) -> the same function."""
    hf_dir, model = write_hf_dir(tmp_path / "hf", shards=3, qk_norm=True)
    assert main(["import", "hf", str(hf_dir), "--run-dir", str(tmp_path / "run")]) == 0
    tokens = np.arange(40, dtype=np.int32).reshape(2, 20) % 48
    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["model_type"] == "qwen3"
    want, _ = model(jnp.asarray(tokens))
    got = logits_of(tmp_path / "run", tokens)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    assert main(["export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert main(["import", "hf", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run2")]) == 0
    np.testing.assert_allclose(logits_of(tmp_path / "run2", tokens), got, atol=1e-6)
    # lm eval reads the imported run like any other
    assert main(["eval", "--run", str(tmp_path / "run"), "--batches", "1"]) == 0


def _err(capfd, argv):
    code = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("breakage,message", [
    ("no-config", "has no config.json"),
    ("arch", "unsupported architecture GPT2LMHeadModel"),
    ("rope", "rope_scaling.rope_type='dynamic'"),
    ("rope-type", "rope_parameters.rope_type='longrope'"),
    ("field", "field fancy_new_knob=3 is not understood"),
    ("missing", "tensor model.layers.1.self_attn.k_proj.weight is missing"),
    ("shape", "tensor model.layers.0.mlp.up_proj.weight [55, 32] does not fit"),
    ("bias", "attention_bias=True is not supported"),
    ("specials", "tokenizer_config.json's eos_token '<s>' is id 0, but config.json's "
                 "eos_token_id is 1 (the tokenizer and the model disagree)"),
    ("token-id", "eos_token_id=[1, 99] is outside the model's vocabulary"),
])
def test_bad_hf_dirs_give_one_line_and_exit_2(tmp_path, capfd, breakage, message):
    from safetensors.numpy import load_file, save_file
    overrides = {"arch": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                 "rope": {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                 "rope-type": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}},
                 "field": {"fancy_new_knob": 3},
                 "bias": {"attention_bias": True},
                 "token-id": {"eos_token_id": [1, 99]}}.get(breakage)
    hf_dir, _ = write_hf_dir(tmp_path / "hf", overrides)
    file = hf_dir / "model.safetensors"
    if breakage == "specials":  # a tokenizer from another model: its EOS is not the model's
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    if breakage == "no-config":
        (hf_dir / "config.json").unlink()
    elif breakage in ("missing", "shape"):
        tensors = load_file(str(file))
        if breakage == "missing":
            del tensors["model.layers.1.self_attn.k_proj.weight"]
        else:
            tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((55, 32), np.float32)
        save_file(tensors, str(file))
    run = tmp_path / "run"
    code, err = _err(capfd, ["import", "hf", str(hf_dir), "--run-dir", str(run)])
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not run.exists()


# What real saves carry besides the numerics: transformers' own bookkeeping, a GGUF
# conversion's `_model_name_or_path`, special token ids of roles lmlab has no use for,
# generation defaults of older configs.
METADATA = {"_model_name_or_path": "converted/model", "_commit_hash": "abc123",
            "unk_token_id": 3, "sep_token_id": None, "decoder_start_token_id": 0,
            "transformers_version": "4.57.1", "torch_dtype": "bfloat16", "dtype": "float32",
            "architectures": ["LlamaForCausalLM"], "use_cache": False,
            "initializer_range": 0.02, "pretraining_tp": 1, "tokenizer_class": "LlamaTokenizer",
            "max_length": 20, "temperature": 0.7, "do_sample": True}


def test_metadata_fields_of_real_saves_import_untouched(tmp_path):
    """`lm import hf` used to refuse `_model_name_or_path`, then `unk_token_id`; every
    metadata field is accepted (the config's function fields stay checked: see
    test_bad_hf_dirs_give_one_line_and_exit_2's fancy_new_knob) and the logits are the
    written model's."""
    hf_dir, model = write_hf_dir(tmp_path / "hf", METADATA)
    before = (hf_dir / "config.json").read_text()
    assert main(["import", "hf", str(hf_dir), "--run-dir", str(tmp_path / "run")]) == 0
    assert (hf_dir / "config.json").read_text() == before
    tokens = np.arange(20, dtype=np.int32).reshape(1, 20) % 44
    want, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(logits_of(tmp_path / "run", tokens), np.asarray(want), atol=1e-5)
    # No generation_config.json in the source: the run's tokenizer takes config.json's ids.
    generation = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


def test_export_refuses_a_model_hf_cannot_express(tmp_path, capfd):
    hf_dir, _ = write_hf_dir(tmp_path / "hf")
    assert main(["import", "hf", str(hf_dir), "--run-dir", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["model"]["logit_softcap"] = 30.0
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    code, err = _err(capfd, ["export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "model.logit_softcap" in err[0], err
    assert not (tmp_path / "o").exists()


@needs_hf
@pytest.mark.slow
def test_lora_runs_export_as_peft_adapters_that_peft_loads(reference, tmp_path):
    """`lm export hf --peft`: a LoRA fine-tune of a transformers-made model (qwen2: GQA,
    q/k/v biases, tied embeddings) becomes an adapter directory that peft.PeftModel loads
    onto that HF directory; a LoRA run from its own init writes its base beside the
    adapter. Both give the lmlab adapter model's logits."""
    from conftest import TINY, lm, sets

    from lm.interop.hf_import import import_hf
    tokens = np.load(reference / "tokens.npy")
    common = [o for o in TINY if not o.startswith("model.")] + [
        "steps=6", "optim.lr=3e-2", "lora.rank=4", "lora.alpha=8",
        "lora.targets=*.mixer.w[qkvo],*.channel.w_*"]
    assert import_hf(reference / "qwen2", tmp_path / "base") == 0
    runs = {"hf": ["--init-from", str(reference / "qwen2")],
            "own": sets("model.mlp.activation=swiglu", "model.n_kv_heads=1")}
    for name, extra in runs.items():
        result = lm("train", "--run-dir", str(tmp_path / name), *extra, *sets(*common))
        assert result.returncode == 0, result.stderr[-2000:]
        out = lm("export", "hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-peft"),
                 "--peft")
        assert out.returncode == 0 and "PEFT LoRA adapter" in out.stdout, out.stderr[-2000:]
    config = json.loads((tmp_path / "hf-peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(reference / "qwen2")
    assert len(config["target_modules"]) == 2 * 7  # q k v o gate up down, 2 layers
    assert (tmp_path / "own-peft" / "base" / "model.safetensors").is_file()
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "peft",
                    str(reference / "tokens.npy"),
                    *(str(tmp_path / f"{n}-peft") for n in runs)],
                   check=True, capture_output=True, text=True, timeout=600)
    for name in runs:
        want = logits_of(tmp_path / name, tokens)
        got = np.load(tmp_path / f"{name}-peft" / "logits_peft.npy")
        print(f"\nPEFT adapter of the {name} LoRA run: max abs logit diff "
              f"{np.max(np.abs(got - want)):.2e}")
        assert np.max(np.abs(got - want)) < TOL, (name, np.max(np.abs(got - want)))
    # Not vacuous: the adapters moved the logits away from the base's.
    base = np.load(reference / "qwen2" / "logits.npy")
    assert np.max(np.abs(logits_of(tmp_path / "hf", tokens) - base)) > 1e-2


# ------------------------------------------------------------- the family records


def _reference_dict(name: str) -> dict:
    """A dict literal of tests/hf_reference.py, keys -> their value's AST node (read from
    its source: lmlab's Python never imports torch)."""
    import ast
    tree = ast.parse((HERE / "hf_reference.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return {k.value: v for k, v in zip(node.value.keys, node.value.values)}
    raise AssertionError(f"no {name} in hf_reference.py")


def _reference_cases() -> dict[str, str]:
    """tests/hf_reference.py's cases: name -> the transformers model class they build."""
    classes = {k: v.value for k, v in _reference_dict("MODEL_CLASSES").items()}
    configs = {k: v.elts[0].attr for k, v in _reference_dict("FAMILIES").items()}
    return {k: classes.get(c, c.replace("Config", "ForCausalLM")) for k, c in configs.items()}


def test_every_registered_family_has_a_reference_case():
    """A family is one record plus its reference case: each registered record's model is
    built by transformers in tests/hf_reference.py and compared both ways here."""
    from lm.interop import families
    cases = _reference_cases()
    assert set(cases) == set(FAMILIES)
    for name, family in families.REGISTRY.items():
        assert name in cases, f"family {name} has no case in tests/hf_reference.py"
        assert cases[name] == family.architecture, (name, cases[name], family.architecture)


def test_a_family_is_one_record():
    import dataclasses

    from lm.interop import families
    from lm.interop.families import (entries, family_for, hf_config_from_model,
                                     model_config_from_hf)
    record = families.get("qwen3_moe")
    assert dataclasses.is_dataclass(record) and record.qk_norm and record.experts.dense_layers
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.qk_norm = False
    # Both directions go through the record: config.json -> ModelConfig -> config.json.
    for name in families.REGISTRY:
        cfg = families.get(name)
        hf = hf_config_from_model(_model_of(name), name, 0, 1, 2)
        assert hf["model_type"] == name and hf["architectures"] == [cfg.architecture]
        back = model_config_from_hf(hf)
        assert cfg.problem(back) is None  # the record expresses what it reads ...
        first = next(f for f in families.REGISTRY.values() if f.problem(back) is None)
        assert family_for(back) == first.model_type  # ... and export writes the first
        assert name in ("helium", "phi3") or first is cfg  # that does (Helium: as Llama)
        assert hf_config_from_model(back, name, 0, 1, 2) == hf
        table = entries(back, name)
        names = [n for e in table if not e.fused for n in e.hf_names]
        fused = [n for e in table if e.fused for n in e.hf_names]
        assert len(names) == len(set(names)) and "model.embed_tokens.weight" in names
        assert not set(fused) & set(names) and (name == "phi3") == bool(fused)


def _model_of(family: str):
    """A tiny lmlab model that `family` expresses."""
    import dataclasses

    from lm.config import ModelConfig
    base = ModelConfig()
    kw = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
              max_seq_len=64, mlp=dataclasses.replace(base.mlp, activation="swiglu"))
    moe = dataclasses.replace(base.moe, n_experts=4, top_k=2, activation="swiglu",
                              router="softmax", renormalize=True)
    att = base.attention
    gemma = dict(norm_position="peri", scale_embeddings=True, logit_softcap=30.0,
                 mlp=dataclasses.replace(base.mlp, activation="geglu"))
    kw.update({
        "llama": {}, "helium": {},
        "phi3": dict(attention=dataclasses.replace(att, window=8)),
        "olmo2": dict(norm_position="out", qk_norm=True, qk_norm_scope="all"),
        "gemma2": dict(gemma, attention=dataclasses.replace(
            att, window=8, window_pattern="lg", softcap=50.0, scale_dim=16.0)),
        "gemma3_text": dict(gemma, qk_norm=True, attention=dataclasses.replace(
            att, window=8, window_pattern="lllllg", local_rope_theta=1e4, scale_dim=12.0)),
        "mistral": dict(attention=dataclasses.replace(att, window=8)),
        "qwen2": dict(attention=dataclasses.replace(att, qkv_bias=True)),
        "qwen3": dict(qk_norm=True),
        "mixtral": dict(channel_pattern="e", moe=moe,
                        attention=dataclasses.replace(att, window=8)),
        "qwen3_moe": dict(qk_norm=True, channel_pattern="fe",
                          moe=dataclasses.replace(moe, renormalize=False)),
    }[family])
    return dataclasses.replace(base, **kw)


def test_mixtral_reads_its_sliding_window():
    # transformers' Mixtral applies config.sliding_window in every layer; lmlab's
    # importer used to drop it (window 0) without a word.
    from lm.interop.families import hf_config_from_model, model_config_from_hf
    hf = hf_config_from_model(_model_of("mixtral"), "mixtral", 0, 1, 2)
    assert hf["sliding_window"] == 8
    assert model_config_from_hf(hf).attention.window == 8
    # Qwen2 carries a sliding_window value that is off without use_sliding_window.
    hf = hf_config_from_model(_model_of("qwen2"), "qwen2", 0, 1, 2) | {"sliding_window": 8}
    assert model_config_from_hf(hf).attention.window == 0


@pytest.mark.parametrize("change,message", [
    (dict(qk_norm=True, qkv_bias=True), "no Hugging Face family lmlab exports expresses this "
     "model: model.attention.qkv_bias=true (llama, mistral, qwen3, mixtral, qwen3_moe, helium, "
     "phi3, olmo2); model.qk_norm=true (qwen2); model.scale_embeddings=false (gemma2, "
     "gemma3_text)"),
    (dict(window=16, qk_norm=True), "model.attention.window (qwen3, qwen3_moe)"),
    (dict(logit_softcap=30.0), "model.logit_softcap (llama, mistral, qwen2, qwen3, mixtral, "
     "qwen3_moe, helium, phi3, olmo2); model.scale_embeddings=false (gemma2, gemma3_text)"),
    (dict(norm_position="out", qk_norm=True), "model.qk_norm_scope=head (olmo2)"),
    (dict(window=16, window_pattern="lg"), "model.attention.window_pattern (global layers "
     "among windowed ones) (llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, helium, phi3, "
     "olmo2)"),
])
def test_export_names_what_no_family_expresses(change, message):
    import dataclasses

    from lm.config import ConfigError
    from lm.interop.families import family_for
    cfg = _model_of("llama")
    att = {k: change.pop(k) for k in ("qkv_bias", "window", "window_pattern") if k in change}
    cfg = dataclasses.replace(cfg, **change,
                              attention=dataclasses.replace(cfg.attention, **att))
    with pytest.raises(ConfigError) as e:
        family_for(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@needs_hf
@pytest.mark.parametrize("family,default", [("helium", "llama"), ("phi3", "mistral")])
def test_a_family_written_by_name_is_the_same_checkpoint(reference, tmp_path, capfd,
                                                         family, default):
    """`lm export hf` writes a Helium import as Llama and a Phi-3 one (with its window)
    as Mistral (the first family that expresses it, checked by the roundtrip above);
    `--family` writes it as itself: its tensors are the source's exactly (Helium's q/k
    channels permuted back to interleaved pairs; Phi-3's q/k/v and gate/up fused again)
    and transformers gives the reference logits."""
    from safetensors.numpy import load_file

    from lm.interop.hf_import import import_hf
    assert import_hf(reference / family, tmp_path / "run") == 0
    capfd.readouterr()
    assert main(["export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "plain")]) == 0
    assert f"as {default} (" in capfd.readouterr().out
    out = tmp_path / "out"
    assert main(["export", "hf", str(tmp_path / "run"), "--out", str(out), "--family",
                 family]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    tensors = load_file(str(out / "model.safetensors"))
    source = load_file(str(reference / family / "model.safetensors"))
    assert set(tensors) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "logits",
                    str(reference / "tokens.npy"), str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    got, want = np.load(out / "logits_hf.npy"), np.load(reference / family / "logits.npy")
    assert np.max(np.abs(got - want)) < TOL
    # A family that cannot express the model is named with what it lacks.
    code, err = _err(capfd, ["export", "hf", str(tmp_path / "run"), "--out",
                             str(tmp_path / "no"), "--family", "olmo2"])
    assert code == 2 and len(err) == 1 and "--family olmo2: model.norm_position=pre" in err[0]


def test_peft_export_refuses_a_fused_base(tmp_path, capfd):
    """A LoRA fine-tune of a Phi-3 directory: its adapters on q, k, v (and gate, up) are
    separate lmlab matrices, which PEFT would have to put on the fused qkv_proj: refused
    with one line (the merged export still works)."""
    from conftest import TINY, lm, sets
    hf_dir, _ = write_hf_dir(tmp_path / "hf", family="phi3")
    common = [o for o in TINY if not o.startswith("model.")] + [
        "steps=2", "checkpoint_every=2", "eval_every=2", "lora.rank=2",
        "lora.targets=*.mixer.w[qkvo]"]
    result = lm("train", "--run-dir", str(tmp_path / "run"), "--init-from", str(hf_dir),
                *sets(*common))
    assert result.returncode == 0, result.stderr[-2000:]
    code, err = _err(capfd, ["export", "hf", str(tmp_path / "run"), "--out",
                             str(tmp_path / "peft"), "--peft"])
    assert code == 2 and len(err) == 1, err
    assert "phi3's model.layers.0.self_attn.qkv_proj.weight fuses" in err[0], err
    assert main(["export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                 "--family", "phi3"]) == 0


def test_export_refuses_a_channel_mixer_no_family_has():
    import dataclasses

    from lm.config import ConfigError
    from lm.interop.families import family_for
    cfg = dataclasses.replace(_model_of("llama"), channel_pattern="fg")  # g: a plug-in's
    with pytest.raises(ConfigError, match="model.channel_pattern .a channel mixer other"):
        family_for(cfg)


# ------------------------------------------------- real saves: the same text out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tests/hf_reference.py's `saved` cases: directories written by transformers'
    save_pretrained (tokenizer_config.json, generation_config.json, the metadata fields
    real saves carry, `_model_name_or_path` as a GGUF conversion adds), each with
    transformers' greedy continuation of a prompt (generate.json)."""
    return hf_reference("saved", tmp_path_factory.mktemp("saved"))


def _listing(d: Path) -> dict:
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(d.iterdir())}


SAVED_CASES = ["llama-bos", "qwen2-plain", "phi3-bos", "olmo2-bos", "gemma2-bos", "gemma3-bos"]


@needs_hf
@pytest.mark.parametrize("case", SAVED_CASES)
def test_greedy_sample_of_an_import_is_transformers_text(saved, tmp_path, capfd, case):
    """`lm sample --temperature 0` prints what transformers' generate(do_sample=False)
    continues the same prompt string with: the prompt framed by the tokenizer's own
    post-processor (BOS for llama-bos's TemplateProcessing, nothing for qwen2-plain;
    lm sample used to put a BOS before every prompt), stopping at any of
    generation_config.json's end-of-sequence ids (llama-bos lists a second one the model
    emits mid-continuation). The directory imports untouched and the vocabulary does not
    grow: the pad token is the EOS token (qwen2-plain has no pad or BOS token at all).
    The other families' cases (llama-bos's tokenizer) take their KV-cache decoding
    through what Llama's lacks: Gemma's local and global layers with their own RoPE and
    soft-caps, OLMo 2's output norms and all-heads qk-norm, Phi-3's fused weights."""
    from lm.data.tokenizers import load_tokenizer
    src = saved / case
    ref = json.loads((src / "generate.json").read_text())
    before = _listing(src)
    run = tmp_path / "run"
    assert main(["import", "hf", str(src), "--run-dir", str(run)]) == 0
    assert _listing(src) == before
    tok = load_tokenizer(str(run / "tokenizer.json"))
    hf_tok = json.loads((src / "tokenizer.json").read_text())
    assert tok.vocab_size == len(hf_tok["model"]["vocab"])  # nothing appended
    assert tok.pad_id == tok.eos_id == (0 if case == "qwen2-plain" else 1)
    assert list(tok.frame(tok.encode(ref["prompt"]))) == ref["prompt_ids"]
    if case == "llama-bos":
        assert tok.stop_ids[0] == 1 and len(tok.stop_ids) == 2
        assert len(ref["new_ids"]) < 24  # transformers stopped at the second EOS id
    capfd.readouterr()
    assert main(["sample", "--run", str(run), "--prompt", ref["prompt"], "--temperature",
                 "0", "--max-new-tokens", "24"]) == 0
    printed = capfd.readouterr().out
    assert printed == ref["text"] + "\n", (printed, ref)
    # Unconditional sampling: a tokenizer that frames an empty prompt as nothing (Qwen)
    # starts from its BOS (here its EOS, <|endoftext|>) rather than refusing.
    assert main(["sample", "--run", str(run), "--prompt", "", "--max-new-tokens", "4"]) == 0
    # lm export hf writes the files that say which ids are special back out.
    assert main(["export", "hf", str(run), "--out", str(tmp_path / "out")]) == 0
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


@needs_hf
@pytest.mark.parametrize("case", ["llama-bos", "qwen2-plain", "gemma2-bos"])
def test_eval_loss_of_an_import_is_transformers_loss(saved, tmp_path, capfd, case):
    """`lm eval` on an imported model gives transformers' mean token loss on the same
    validation rows (the embedded corpus, framed by the model's tokenizer: BOS first for
    llama-bos, nothing for qwen2-plain), padding out of the loss; transformers runs each
    document of a row alone, as lmlab's segment mask sees it."""
    from lm.config import load_run_config
    from lm.data import eval_batches
    from lm.data.tokenizers import load_tokenizer
    run = tmp_path / "run"
    assert main(["import", "hf", str(saved / case), "--run-dir", str(run)]) == 0
    capfd.readouterr()
    assert main(["eval", "--run", str(run), "--batches", "2"]) == 0
    ours = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    cfg = load_run_config(run / "config.json")
    batches = eval_batches(cfg.data, load_tokenizer(str(run / "tokenizer.json")),
                           cfg.batch_size, 2)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in
            ("inputs", "targets", "segment_ids", "loss_mask")}
    assert (rows["inputs"][0, 0] == 0) == (case != "qwen2-plain")  # BOS (id 0) or none
    np.savez(tmp_path / "rows.npz", **rows)
    out = subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "loss",
                          str(tmp_path / "rows.npz"), str(saved / case)],
                         check=True, capture_output=True, text=True, timeout=600)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    assert ref["tokens"] == float(rows["loss_mask"].sum())
    assert abs(ours["val_loss"] - ref["loss"]) < 1e-4, (ours, ref)


# ------------------------------------- the newer families' config.json, both vintages


def test_gemma_configs_as_older_transformers_saved_them():
    """Hub configs of Gemma 2 / 3 written before transformers 5: no layer_types (one
    global layer in 2, or in sliding_window_pattern), Gemma 3's rope_theta +
    rope_local_base_freq + rope_scaling instead of rope_parameters per layer type,
    hidden_act beside hidden_activation, cache_implementation."""
    from lm.interop.families import hf_config_from_model, model_config_from_hf
    hf = hf_config_from_model(_model_of("gemma3_text"), "gemma3_text", 0, 1, 2)
    for key in ("layer_types", "rope_parameters"):
        del hf[key]
    hf.update(num_hidden_layers=26, sliding_window=512, sliding_window_pattern=6,
              rope_theta=1e6, rope_local_base_freq=1e4, hidden_act="gelu_pytorch_tanh",
              rope_scaling={"rope_type": "linear", "factor": 8.0},
              cache_implementation="hybrid")
    cfg = model_config_from_hf(hf)
    a = cfg.attention
    assert (a.window, a.window_pattern, a.local_rope_theta) == (512, "lllllg", 1e4)
    assert (cfg.rope_theta, cfg.rope_scaling.type, cfg.rope_scaling.factor) == (1e6, "linear", 8.0)
    assert cfg.qk_norm and cfg.scale_embeddings and cfg.mlp.activation == "geglu"
    written = hf_config_from_model(cfg, "gemma3_text", 0, 1, 2)
    assert written["layer_types"].count("full_attention") == 4  # layers 5, 11, 17, 23
    assert written["rope_parameters"]["sliding_attention"] == {"rope_type": "default",
                                                               "rope_theta": 1e4}
    hf = hf_config_from_model(_model_of("gemma2"), "gemma2", 0, 1, 2)
    for key in ("layer_types", "final_logit_softcapping", "query_pre_attn_scalar"):
        del hf[key]  # Gemma2Config's defaults: 30.0, 256
    cfg = model_config_from_hf(hf | {"hidden_act": "gelu_pytorch_tanh"})
    assert (cfg.attention.window_pattern, cfg.logit_softcap, cfg.attention.scale_dim) == (
        "lg", 30.0, 256.0)


@pytest.mark.parametrize("family,change,message", [
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                  "partial_rotary_factor": 0.75}},
     "rope_parameters.partial_rotary_factor=0.75 is not supported"),
    ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop=0.1 is not supported"),
    ("olmo2", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ("gemma2", {"layer_types": ["chunked_attention", "full_attention"]},
     "layer_types=['chunked_attention', 'full_attention'] is not one of"),
    ("gemma3_text", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention="),
])
def test_new_families_refuse_what_lmlab_does_not_compute(family, change, message):
    from lm.config import ConfigError
    from lm.interop.families import hf_config_from_model, model_config_from_hf
    hf = hf_config_from_model(_model_of(family), family, 0, 1, 2) | change
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        model_config_from_hf(hf)
    assert "\n" not in str(e.value)
