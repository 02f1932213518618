"""run_dir.py: what a run writes into its directory, read back with json."""
import json

import torch

from train.config import TrainConfig
from train.run_dir import MetricsLog


def test_metrics_are_written_at_full_float_precision(one_process_group, tmp_path):
    """metrics.jsonl keeps every digit of a float: rounding to 6 decimals hid differences below
    ~3e-5 relative at small losses."""
    log = MetricsLog(TrainConfig(out_dir=str(tmp_path)), torch.device("cpu"))
    values = {"loss": torch.tensor(0.0123456789012345, dtype=torch.float64), "lr": 3.14159265358979e-05}
    returned = log.record(7, values)
    [line] = [json.loads(text) for text in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line == returned == {"step": 7, "loss": 0.0123456789012345, "lr": 3.14159265358979e-05}
