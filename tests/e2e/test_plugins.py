"""The plug-in seams: mixers and optimizer directions register themselves and bring
their config sections; configs of the flat layout keep loading; unknown logical axes
are refused; FLOPs per token come from the mixers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import pytest
from conftest import ROOT
from jax.sharding import Mesh

from lm import config as config_lib
from lm.config import ConfigError, ModelConfig, TrainConfig
from lm.model import count_params, flops_per_token
from lm.model.mixers import SEQUENCE_MIXERS, scan_flops_per_token
from lm.parallel.sharding import DEFAULT_RULES, spec_for

# A mixer a newcomer would write: one file, registered by its decorator, imported before
# or after lm.config (its section is read from the registry when it is used). Its knobs
# declare their docs and roles, its matrices what LoRA may adapt.
GLU_MIXER = '''
"""GLU channel mixer (Dauphin et al. 2017): W_out (sigmoid(x W_gate) * (x W_in))."""
import math
from dataclasses import dataclass
from typing import Literal

import jax
from flax import nnx

from lm.errors import ConfigError
from lm.model.layers import DTYPES, hidden_std, param
from lm.model.mixers import ChannelMixer, register
from lm.schema import knob


@dataclass(frozen=True)
class GLUConfig:
    """GLU channel mixer (channel code "g")."""
    ratio: float = knob(2.0, doc="Hidden width = ratio * d_model.")
    impl: Literal["auto", "xla"] = knob("auto", roles={"free_init", "eval_time"},
                                        doc="A kernel choice: the weights fit either.")


@register
class GLU(ChannelMixer):
    name, code, Config = "glu", "g", GLUConfig
    adaptable = {"w_in": 1, "w_gate": 1, "w_out": 1}

    @classmethod
    def validate(cls, cfg):
        if cfg.glu.ratio <= 0:
            raise ConfigError(f"model.glu.ratio must be positive, got {cfg.glu.ratio}")

    def __init__(self, cfg, rngs):
        d, f, pdt = cfg.d_model, int(cfg.glu.ratio * cfg.d_model), DTYPES[cfg.param_dtype]
        self.w_in = param(rngs, (d, f), ("embed", "mlp"), hidden_std(cfg, d), pdt)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), hidden_std(cfg, d), pdt)
        self.w_out = param(rngs, (f, d), ("mlp", "embed"),
                           hidden_std(cfg, f) / math.sqrt(2 * cfg.n_layers), pdt)

    def __call__(self, x):
        return (jax.nn.sigmoid(x @ self.w_gate[...]) * (x @ self.w_in[...])) @ self.w_out[...]
'''


@pytest.mark.slow
def test_a_new_mixer_is_one_file_and_trains_end_to_end(tmp_path):
    """Register the GLU file, then train with MLP and GLU layers alternating: its section
    is settable from the command line, validated, saved in config.json and counted."""
    (tmp_path / "glu_mixer.py").write_text(GLU_MIXER)
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import glu_mixer  # the registration
        from lm.cli import main
        base = ["--set", "model.d_model=32", "--set", "model.n_layers=2",
                "--set", "model.n_heads=2", "--set", "model.max_seq_len=32",
                "--set", "data.seq_len=16", "--set", "batch_size=4", "--set", "steps=2",
                "--set", "eval_batches=1", "--set", "tensorboard=false",
                "--set", "model.channel_pattern=fg"]
        assert main(["train", *base, "--set", "model.glu.ratio=-1",
                     "--run-dir", {str(tmp_path / 'bad')!r}]) == 2
        sys.exit(main(["train", *base, "--set", "model.glu.ratio=3",
                       "--run-dir", {str(run)!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.glu.ratio must be positive, got -1.0" in result.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["glu"] == {"ratio": 3.0, "impl": "auto"}
    summary = json.loads((run / "summary.json").read_text())
    # Layer 1's MLP (w_in, w_out: [32, 128] each) became a GLU (three [32, 96] matrices).
    dense = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    expected = count_params(dense)["non_embedding"] - 2 * 32 * 128 + 3 * 32 * 96
    assert summary["non_embedding_params"] == expected
    assert summary["flops_per_token"] == pytest.approx(
        flops_per_token(dense, 16) + 6 * (expected - count_params(dense)["non_embedding"]))
    assert not (tmp_path / "bad").exists()


# An update direction a newcomer would write, with a knob batched trials may trace.
SIGN_OPTIMIZER = '''
from dataclasses import dataclass

import optax

from lm.errors import ConfigError
from lm.optim import Direction, register
from lm.schema import knob


@dataclass(frozen=True)
class SignConfig:
    """signSGD with momentum."""
    beta: float = knob(0.9, roles={"traced"}, doc="Momentum.")


@register
class Sign(Direction):
    name, Config = "sign", SignConfig

    @staticmethod
    def transform(section, axes_tree=None):
        return optax.chain(optax.trace(decay=section.beta), optax.scale_by_sign())

    @staticmethod
    def validate(section):
        if not 0 <= section.beta < 1:
            raise ConfigError(f"optim.sign.beta must be in [0, 1), got {section.beta}")
'''


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "glu_mixer.py").write_text(GLU_MIXER)
    (tmp_path / "sign_optimizer.py").write_text(SIGN_OPTIMIZER)
    script = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                         "PYTHONPATH": str(ROOT)}, timeout=300)


def test_plugins_imported_after_lm_config_get_their_sections_and_roles(tmp_path):
    """A mixer and an optimizer imported after lm.config (and after a config was made):
    their sections are settable, validated, round-trip through config.json, old configs
    read them at their defaults; their knobs' roles reach every computed list (eval-time,
    free under --init-from, traced) without editing one; their matrices are LoRA targets."""
    result = _run_script(tmp_path, """
        import dataclasses, json
        from lm import config as C
        from lm.evals.overrides import check_keys, eval_time_keys
        from lm.train.setup import operational_fields
        from lm.train.trials import batchable_fields, traced_fields
        before = C.TrainConfig()
        old_json = C.to_json(before)
        assert "model.glu.impl" not in eval_time_keys()
        import glu_mixer, sign_optimizer  # noqa: the registrations, after lm.config
        assert before.model.glu == glu_mixer.GLUConfig() and before.optim.sign.beta == 0.9
        cfg = C.apply_overrides(C.TrainConfig(), [
            "model.channel_pattern=fg", "model.glu.ratio=3", "model.glu.impl=xla",
            "optim.name=sign", "optim.sign.beta=0.5"])
        C.validate(cfg)
        saved = json.loads(C.to_json(cfg))
        assert saved["model"]["glu"] == {"ratio": 3.0, "impl": "xla"}, saved["model"]["glu"]
        assert saved["optim"]["sign"] == {"beta": 0.5}
        assert C.from_json(C.to_json(cfg)) == cfg
        assert C.from_json(old_json).model.glu.ratio == 2.0  # an older config.json
        assert C.from_json(C.to_json(C.TrainConfig())) == C.TrainConfig() == before
        for bad, msg in (("model.glu.ratio=-1", "model.glu.ratio must be positive"),
                         ("optim.sign.beta=2", "optim.sign.beta must be in [0, 1)")):
            try:
                C.validate(C.apply_overrides(cfg, [bad]))
                raise SystemExit(f"{bad} was accepted")
            except C.ConfigError as e:
                assert msg in str(e), e
        assert "model.glu.impl" in C.keys_with_role("free_init")  # lm/train/init_from.py
        assert "model.glu.ratio" not in C.keys_with_role("free_init")
        assert "model.glu.impl" in eval_time_keys()
        check_keys(["model.glu.impl=xla"])
        assert "optim.sign.beta" in traced_fields() and "optim.sign.beta" in batchable_fields()
        assert not {k for k in operational_fields() if "glu" in k or "sign" in k}
        from flax import nnx
        from lm.peft.lora import LoRAModel
        model = dataclasses.replace(cfg.model, vocab_size=40, d_model=16, n_layers=2,
                                    n_heads=2)
        lora = C.LoRAConfig(rank=2, targets="*.channel.w_*")
        targets = LoRAModel(model, lora, nnx.Rngs(0)).targets
        assert {".".join(map(str, t)) for t in targets} >= {"blocks.1.channel.w_gate"}
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_plugin_channel_mixer_is_refused_by_export_hf_in_one_line(tmp_path):
    """lm export hf on a model with a plug-in channel mixer: no Hugging Face family has
    it, one line and exit 2 (not a traceback)."""
    run, out = tmp_path / "run", tmp_path / "hf"
    train = _run_script(tmp_path, f"""
        from lm.cli import main
        import glu_mixer  # noqa
        sys.exit(main(["train", "--run-dir", {str(run)!r}, "--set", "model.d_model=32",
                       "--set", "model.n_layers=2", "--set", "model.n_heads=2",
                       "--set", "model.max_seq_len=32", "--set", "data.seq_len=16",
                       "--set", "batch_size=4", "--set", "steps=2", "--set", "eval_batches=1",
                       "--set", "tensorboard=false", "--set", "model.channel_pattern=fg",
                       "--set", "model.mlp.activation=swiglu"]))
    """)
    assert train.returncode == 0, train.stderr[-3000:]
    result = _run_script(tmp_path, f"""
        import glu_mixer  # noqa
        from lm.cli import main
        sys.exit(main(["export", "hf", {str(run)!r}, "--out", {str(out)!r}]))
    """)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "model.channel_pattern" in lines[0], result.stderr[-3000:]
    assert not out.exists()


def test_registered_mixers_and_their_sections():
    from lm import schema
    from lm.config import OptimConfig
    assert {code: m.name for code, m in SEQUENCE_MIXERS.items()} == {
        "a": "attention", "m": "mamba2", "r": "retention", "-": "skip"}  # - : pruned away
    cfg = ModelConfig()
    assert dataclasses.is_dataclass(cfg.attention) and cfg.mlp.activation == "gelu"
    assert TrainConfig().optim.adamw.b2 == 0.95
    # The built-in sections are declared, typed fields (editors and type checkers see
    # them), each the class its mixer or optimizer registered.
    assert schema.plugin_sections(ModelConfig) == {} == schema.plugin_sections(OptimConfig)
    declared = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"attention", "mamba2", "retention", "mlp", "moe"} <= declared
    assert ModelConfig.__annotations__["attention"] == "AttentionConfig"


def test_sections_are_set_and_validated_from_the_command_line():
    cfg = config_lib.apply_overrides(TrainConfig(), [
        "model.attention.window=16", "model.mamba2.state=8", "optim.adamw.b1=0.8"])
    assert (cfg.model.attention.window, cfg.model.mamba2.state, cfg.optim.adamw.b1) == (16, 8, 0.8)
    with pytest.raises(ConfigError, match="unknown config key 'model.attention.windw'"):
        config_lib.apply_overrides(TrainConfig(), ["model.attention.windw=3"])
    with pytest.raises(ConfigError, match="model.mamba2.state must be positive"):
        config_lib.validate(config_lib.apply_overrides(
            TrainConfig(), ["model.mixer_pattern=am", "model.mamba2.state=0"]))
    # A section of a mixer no layer uses is not validated against.
    config_lib.validate(config_lib.apply_overrides(TrainConfig(), ["model.mamba2.state=0"]))


# The flat layout of earlier releases (config.json and --set keys).
OLD_MODEL = {"attention_impl": "pallas", "attention_window": 8, "attention_sinks": 2,
             "attention_q_blocks": 2, "mlp": "swiglu", "mlp_ratio": 3.0, "ssm_state": 16,
             "ssm_expand": 3, "ssm_conv": 2, "scan_chunk": 32, "scan_impl": "xla",
             "d_model": 64}


def test_an_old_config_json_loads_into_the_sections():
    old = config_lib.to_dict(TrainConfig())
    for section in ("attention", "mamba2", "retention", "mlp"):
        del old["model"][section]
    old["model"].update(OLD_MODEL)
    del old["optim"]["adamw"]
    old["optim"].update(b1=0.8, b2=0.99, eps=1e-6)
    del old["optim"]["name"]
    cfg = config_lib.from_json(json.dumps(old))
    m = cfg.model
    assert m.attention == dataclasses.replace(m.attention, impl="pallas", window=8, sinks=2,
                                              q_blocks=2)
    assert (m.mlp.activation, m.mlp.ratio) == ("swiglu", 3.0)
    assert (m.mamba2.state, m.mamba2.expand, m.mamba2.conv, m.mamba2.chunk,
            m.mamba2.scan_impl) == (16, 3, 2, 32, "xla")
    assert (m.retention.chunk, m.retention.scan_impl) == (32, "xla")
    assert (cfg.optim.name, cfg.optim.adamw.b1, cfg.optim.adamw.b2, cfg.optim.adamw.eps) == (
        "adamw", 0.8, 0.99, 1e-6)
    # The new layout round-trips and the old --set keys land in the same places.
    assert config_lib.from_json(config_lib.to_json(cfg)) == cfg
    via_set = config_lib.apply_overrides(TrainConfig(), [
        f"model.{k}={v}" for k, v in OLD_MODEL.items()] + ["optim.b1=0.8", "optim.b2=0.99",
                                                           "optim.eps=1e-6"])
    assert via_set.model == m and via_set.optim == cfg.optim


def test_an_unknown_logical_axis_is_refused_not_replicated():
    mesh = Mesh(jax.devices()[:1], ("data",))
    rules = {**DEFAULT_RULES}
    with pytest.raises(ValueError, match="logical axis 'widgets' has no sharding rule"):
        spec_for(("widgets", "embed"), (4, 8), mesh, rules)


def test_every_parameter_of_every_mixer_has_a_sharding_rule():
    from flax import nnx

    from lm.model import Transformer, param_axes
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, mixer_pattern="amr",
                      channel_pattern="fe")
    axes = jax.tree.leaves(param_axes(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))),
                           is_leaf=lambda x: isinstance(x, tuple))
    assert {name for names in axes for name in names} <= set(DEFAULT_RULES)


def test_flops_per_token_counts_each_mixer():
    base = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, max_seq_len=256)
    seq = 256

    def matmuls(cfg):
        return 6 * (count_params(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model)

    attn = flops_per_token(base, seq)
    assert attn - matmuls(base) == pytest.approx(2 * 6 * 2 * (seq + 1) / 2 * 4 * 16)
    windowed = dataclasses.replace(base, attention=dataclasses.replace(base.attention, window=16))
    w_keys = (16 * 17 / 2 + (seq - 16) * 16) / seq
    assert flops_per_token(windowed, seq) - matmuls(base) == pytest.approx(2 * 12 * w_keys * 64)
    mamba = dataclasses.replace(base, mixer_pattern="m")
    width = 2 * 64 // 4  # expand * d_model / heads
    assert flops_per_token(mamba, seq) - matmuls(mamba) == pytest.approx(
        2 * scan_flops_per_token(mamba, seq, 64, 4, 64, width))
    assert scan_flops_per_token(mamba, seq, 64, 4, 64, width) == 3 * 4 * (
        2 * 64 * (64 + width) + 4 * 64 * width)
    hybrid = dataclasses.replace(base, mixer_pattern="ma")
    assert flops_per_token(hybrid, seq) - matmuls(hybrid) == pytest.approx(
        (attn - matmuls(base)) / 2 + (flops_per_token(mamba, seq) - matmuls(mamba)) / 2)


@pytest.mark.parametrize("pattern,tolerance", [("a", 0.1), ("m", 0.02), ("r", 0.02)])
def test_flops_per_token_matches_xla_cost_analysis(pattern, tolerance):
    """XLA's own FLOP count of the compiled forward + backward. One scan chunk spans the
    sequence (XLA counts a loop body once, not per iteration); attention's blocked
    scores do a little more than the causal half the formula counts."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from lm.model import Transformer
    seq = 256
    cfg = ModelConfig(vocab_size=259, d_model=128, n_layers=2, n_heads=4, max_seq_len=seq,
                      mixer_pattern=pattern)
    cfg = dataclasses.replace(cfg, mamba2=dataclasses.replace(cfg.mamba2, chunk=seq),
                              retention=dataclasses.replace(cfg.retention, chunk=seq))
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((2, seq), jnp.int32)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = cost["flops"] / tokens.size
    assert xla == pytest.approx(flops_per_token(cfg, seq), rel=tolerance)
