"""User errors: one line naming the problem, exit 2, nothing written. The cases run `lm`
in this process (`lm_here`); one case of each kind also runs the real command."""

from __future__ import annotations

from conftest import TINY, lm, sets

BAD_CONFIGS = [
    (["model.n_layerz=3"], "unknown config key 'model.n_layerz'"),
    (["model.n_layers=three"], "model.n_layers: expected an int"),
    (["model.norm=batch"], "model.norm: expected one of"),
    (["model.d_model=30", "model.n_heads=4"], "model.d_model=30 is not divisible by model.n_heads=4"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["data.seq_len=128", "model.max_seq_len=64"], "data.seq_len=128 is longer than model.max_seq_len=64"),
    (["grad_accum=3"], "grad_accum=3 must divide batch_size=4"),
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["model.mixer_pattern=amx"], "model.mixer_pattern='amx' must be"),
    (["model.mixer_pattern=ma", "model.scan_layers=true"], "model.scan_layers needs one mixer type"),
    (["model.attention.sinks=2"], "model.attention.sinks needs model.attention.window"),
    (["model.attention_sinks=2"], "model.attention.sinks needs model.attention.window"),  # old key
    (["model.attention.impl=cudnn"], "model.attention.impl=cudnn needs an NVIDIA GPU"),
    (["model.channel_pattern=fx"], "model.channel_pattern='fx' must be"),
    (["optim.name=sgd"], "optim.name='sgd': expected one of adamw"),
    (["optim.adamw.b2=1.5"], "optim.adamw.b2 must be in [0, 1)"),
    (["data.prefetch=-2"], "data.prefetch must be >= 0 (or -1 = auto)"),
    (["model.mixer_pattern=m", "model.n_heads=3", "model.head_dim=8"],
     "model.n_heads=3 must divide the Mamba-2 inner width"),
    (["model"], "not of the form key=value"),
    (["model=3"], "'model' is a section"),
]


def check_one_line_exit_2(result, run, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not run.exists()


def test_bad_config_through_the_real_command(tmp_path):
    overrides, message = BAD_CONFIGS[0]
    run = tmp_path / "run"
    check_one_line_exit_2(lm("train", "--run-dir", str(run), *sets(*TINY, *overrides)),
                          run, message)


def test_bad_data_through_the_real_command(tmp_path):
    run = tmp_path / "run"
    check_one_line_exit_2(lm("train", "--run-dir", str(run),
                             *sets(*TINY, f"data.corpus={tmp_path / 'missing.txt'}")),
                          run, "no such file", "data.corpus")


def test_config_file_syntax_error_through_the_real_command(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def config(:\n    pass\n")
    run = tmp_path / "run"
    check_one_line_exit_2(lm("train", "--config", str(path), "--run-dir", str(run)),
                          run, f"config file {path}, line 1: SyntaxError")


def test_damaged_config_json_through_the_real_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"d_mod')
    result = lm("eval", "--run", str(run))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run / "config.json") in lines[0], result.stderr


def test_bad_sampling_flag_through_the_real_command(tiny_run):
    result = lm("sample", "--run", str(tiny_run), "--top-p", "1.5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: lm sample --top-p must be in (0, 1] (1 = off), got 1.5"]
