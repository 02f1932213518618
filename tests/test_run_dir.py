"""run_dir.py: what a run writes into its directory, read back with json."""
import json

import pytest
import torch

from train.config import TrainConfig
from train.run_dir import MetricsLog, write_atomic


def test_metrics_are_written_at_full_float_precision(one_process_group, tmp_path):
    """metrics.jsonl keeps every digit of a float: rounding to 6 decimals hid differences below
    ~3e-5 relative at small losses."""
    log = MetricsLog(TrainConfig(out_dir=str(tmp_path)), torch.device("cpu"))
    values = {"loss": torch.tensor(0.0123456789012345, dtype=torch.float64), "lr": 3.14159265358979e-05}
    returned = log.record(7, values)
    [line] = [json.loads(text) for text in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line == returned == {"step": 7, "loss": 0.0123456789012345, "lr": 3.14159265358979e-05}


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """write_atomic with a writer that fails half-way (a full disk): the exception as it was, the old
    file whole, and nothing else in the folder (the GPU machine returns 8 files from its output
    folder: a leftover would take one)."""
    path = tmp_path / "summary.json"
    write_atomic(str(path), '{"old": true}')

    def torn(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(str(path), torn)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"] and path.read_text() == '{"old": true}'
