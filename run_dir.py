"""The run directory (out_dir), as rank 0 writes it: config.yaml, metrics.jsonl (and W&B), the
sample files (samples.md, the before/after table). Files are replaced whole (written beside, then renamed), so a crash leaves the old
file or the new one. The checkpoints under out_dir/checkpoints/ are checkpoint.py's.
"""
import dataclasses
import json
import os

from data.tokenizer import decode
from errors import ConfigError
from parallel import on_rank0
from train_config import TrainConfig, dump_config


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_writable(out_dir):
    """Refuse a run directory that can't be written, before training rather than at the first
    checkpoint."""
    probe = os.path.join(out_dir, ".write_test")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"out_dir {out_dir!r} is not writable ({err})") from err


class MetricsLog:
    """metrics.jsonl (one JSON object per line, each with its step), and W&B when asked. Every rank
    holds one and calls `record` with the same values; rank 0 writes."""

    def __init__(self, cfg: TrainConfig, device):
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.device, self.wandb_run = device, None
        if cfg.wandb_log:
            on_rank0(self._start_wandb, device, "start Weights & Biases", cfg)

    def _start_wandb(self, cfg):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("--wandb_log needs Weights & Biases: pip install wandb") from err
        self.wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.out_dir)

    def record(self, step: int, metrics: dict) -> dict:
        """Collective. Append one line: the step and each metric at full float precision; returns it."""
        line = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        on_rank0(self._append, self.device, f"append to {self.path}", line)
        if self.wandb_run is not None:
            self.wandb_run.log(line, step=step)
        return line

    def _append(self, line):
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()


def keep_metrics_until(out_dir, step: int):
    """Keep metrics.jsonl's lines up to `step` (the checkpoint resumed from); step 0, a fresh
    start, drops an earlier attempt's lines (its step-0 eval is recorded again)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if step > 0 and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(kept))


def write_config(cfg: TrainConfig):
    write_atomic(os.path.join(cfg.out_dir, "config.yaml"), dump_config(cfg))


# ----------------------------------------------------------------------------- the before/after samples

def samples_table(prompts, before, after):
    rows = ["| Prompt | Before training (reference) | After training (policy) |", "| --- | --- | --- |"]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    for prompt, b, a in zip(prompts, before, after):
        rows.append(f"| {cell(prompt)} | {cell(b)} | {cell(a)} |")
    return "\n".join(rows) + "\n"


def write_samples_before(cfg, prompts, before):
    write_atomic(os.path.join(cfg.out_dir, "samples_before.json"), json.dumps(before))
    write_atomic(os.path.join(cfg.out_dir, "samples.md"),
                 samples_table([decode(p) for p in prompts], before, ["(training)"] * len(before)))


def write_samples_table(cfg, prompts, after, log):
    with open(os.path.join(cfg.out_dir, "samples_before.json")) as f:
        before = json.load(f)
    table = samples_table([decode(p) for p in prompts], before, after)
    write_atomic(os.path.join(cfg.out_dir, "samples.md"), table)
    log("\n" + table)
