"""errors.exit_code_of, every command's error boundary, and the commands that use it: bad input is
one line and exit 2, a run stopped on purpose one line and exit 1, anything else keeps its traceback."""
import pytest

import plot_metrics
import sample
from errors import ConfigError, Preempted, TrainingStopped, exit_code_of
from gpt2 import WeightsError


def raising(error):
    def main(*args):
        raise error
    return main


@pytest.mark.parametrize("error, code, line", [
    (ConfigError("lr must be > 0, got -1"), 2, "error: lr must be > 0, got -1\n"),
    (WeightsError("config.json: missing keys"), 2, "error: config.json: missing keys\n"),
    (TrainingStopped("stopping at step 3"), 1, "error: stopping at step 3\n"),
    (Preempted(15, "stopped by SIGTERM after step 4"), 143, "stopped by SIGTERM after step 4\n"),
])
def test_each_error_type_is_one_line_and_its_exit_code(capsys, error, code, line):
    assert exit_code_of(raising(error)) == code
    assert capsys.readouterr().err == line


def test_anything_else_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        exit_code_of(raising(ZeroDivisionError("a bug")))
    with pytest.raises(ValueError):  # a plain ValueError is not bad input: it may be a bug anywhere
        exit_code_of(raising(ValueError("from deep inside torch")))


def test_the_commands_report_bad_input_through_it(tmp_path, capsys):
    assert exit_code_of(plot_metrics.main, [str(tmp_path / "no_run")]) == 2
    assert exit_code_of(sample.main, ["--model", str(tmp_path / "no_model")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") and "no_" in e for e in errors)
