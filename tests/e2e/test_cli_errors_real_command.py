"""User errors through the real `lm` command, one case of each kind: one line naming the
problem, exit 2, nothing written (tests/unit/test_cli_errors.py: every case, in-process)."""

from __future__ import annotations

from conftest import TINY, lm, sets

def check_one_line_exit_2(result, run, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not run.exists()


def test_bad_config_through_the_real_command(tmp_path):
    overrides, message = ["model.n_layerz=3"], "unknown config key 'model.n_layerz'"
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
