"""User errors: one line naming the problem, exit 2, nothing written. The cases run `lm`
in this process (`lm_here`); one case of each kind also runs the real command."""

from __future__ import annotations

import pytest
from conftest import TINY, sets

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


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, lm_here, overrides,
                                                              message):
    run = tmp_path / "run"
    check_one_line_exit_2(lm_here("train", "--run-dir", str(run), *sets(*TINY, *overrides)),
                          run, message)


@pytest.mark.parametrize("make_corpus,message", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "no documents"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and None or d / "bad.jsonl",
     "line 2"),
])
def test_bad_data_exits_with_one_line_and_writes_nothing(tmp_path, lm_here, make_corpus,
                                                          message):
    corpus = make_corpus(tmp_path)
    run = tmp_path / "run"
    check_one_line_exit_2(lm_here("train", "--run-dir", str(run),
                                  *sets(*TINY, f"data.corpus={corpus}")),
                          run, message, "data.corpus")


def test_missing_config_file_and_run_dir(tmp_path, lm_here):
    result = lm_here("train", "--config", str(tmp_path / "nope.py"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = lm_here("sample", "--run", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr


# ------------------------------------------------------------ a config file that fails


@pytest.mark.parametrize("source, words", [
    ("from lm.config import TrainConfig\n\ndef config(:\n    return TrainConfig()\n",
     [", line 3: SyntaxError: "]),
    ("from lm.config import TrainConfig\nX = undefined_name\n",
     [", line 2: NameError: name 'undefined_name' is not defined"]),
    ("def config():\n    return {}['model']\n", [", line 2: KeyError: 'model'"]),
])
def test_config_file_that_fails_to_run_is_one_line_with_file_and_line(tmp_path, lm_here,
                                                                       source, words):
    path = tmp_path / "broken.py"
    path.write_text(source)
    run = tmp_path / "run"
    check_one_line_exit_2(lm_here("train", "--config", str(path), "--run-dir", str(run)),
                          run, f"config file {path}", *words)


# ------------------------------------------------------------ a damaged run directory

DAMAGED_CONFIGS = [
    ('{"model": {"d_mod', "is damaged"),  # cut short (a partial copy)
    ("\x00\x13garbage\xff", "is damaged"),
    ("[1, 2]", "is damaged"),
    ('{"model": {"d_model": "wide"}}', "model.d_model: expected int"),
]


@pytest.mark.parametrize("text, words", DAMAGED_CONFIGS)
@pytest.mark.parametrize("command", ["eval", "sample", "train"])
def test_damaged_config_json_in_a_run_dir_is_one_line_naming_it(tmp_path, lm_here, command,
                                                                text, words):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text, errors="surrogateescape")
    before = sorted(p.name for p in run.iterdir())
    args = ["--run-dir", str(run), *sets(*TINY)] if command == "train" else ["--run", str(run)]
    result = lm_here(command, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{run / 'config.json'}" in lines[0] and words in lines[0], lines
    # Nothing written (the trainer checks the run dir once it holds its lock file).
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == before


# ------------------------------------------------------------ sampling flags

BAD_SAMPLING = [
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--chat", "hi", "--prompt", "x"], "--chat and --prompt exclude each other"),
    (["--system", "be brief"], "--system needs --chat"),
]


@pytest.mark.parametrize("flags, message", BAD_SAMPLING)
def test_bad_sampling_flag_exits_2_naming_it(tmp_path, lm_here, flags, message):
    # Checked before the run is read: the run dir need not exist.
    result = lm_here("sample", "--run", str(tmp_path / "run"), *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: lm sample {message}"), lines




@pytest.mark.parametrize("command,flags,message", [
    ("generate", ["--in", "p.jsonl", "--out", "o.jsonl", "--batch", "0"], "lm generate --batch must be >= 1"),
    ("generate", ["--in", "p.jsonl", "--out", "o.jsonl", "--pages", "1"], "lm generate --pages must be 0 (auto)"),
    ("serve", ["--page-size", "0"], "lm serve --page-size must be >= 1"),
    ("serve", ["--prefill-tokens", "-1"], "lm serve --prefill-tokens must be >= 0"),
])
def test_bad_engine_sizes_are_one_line_before_any_loading(tmp_path, lm_here, command, flags,
                                                          message):
    """The engine's size flags (engine_options, shared by lm generate and lm serve) are
    checked before the run (here: none) is read."""
    result = lm_here(command, "--run", str(tmp_path / "no-run"), *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
