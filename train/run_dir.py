"""The run directory (out_dir): its layout (every path in it is named here, once), and what rank 0
writes there: config.yaml, metrics.jsonl (and W&B), the sample files (samples.md, the before/after
table). Files are replaced whole (written beside, then renamed), so a crash leaves the old file or
the new one. What is inside checkpoints/ is checkpoint.py's.
"""
import dataclasses
import fcntl
import json
import os
import socket
import time

import torch
import torch.distributed as dist

from data.tokenizer import decode
from errors import ConfigError, DataError, TrainingStopped
from train.config import TrainConfig, dump_config
from train.rank0 import on_rank0


# ----------------------------------------------------------------------------- the layout

def metrics_file(out_dir):  # one JSON object per log line (MetricsLog)
    return os.path.join(out_dir, "metrics.jsonl")


def config_file(out_dir):  # the resolved config
    return os.path.join(out_dir, "config.yaml")


def samples_file(out_dir):  # the before/after table
    return os.path.join(out_dir, "samples.md")


def samples_before_file(out_dir):  # the "before" samples, kept for the table at the end
    return os.path.join(out_dir, "samples_before.json")


def checkpoints_dir(out_dir):  # checkpoint.py's: step_N/, .tmp_step_N/
    return os.path.join(out_dir, "checkpoints")


def reference_cache_file(out_dir):  # precompute_reference's log-probs (evaluation.py)
    return os.path.join(out_dir, "reference_logps.safetensors")


def sft_dir(out_dir):  # the SFT warm start's model and recipe (warm_start.py)
    return os.path.join(out_dir, "sft")


def final_dir(out_dir):  # the export: a Hugging Face model folder (export.py)
    return os.path.join(out_dir, "final")


# ----------------------------------------------------------------------------- atomic writes

def write_atomic(path, data):
    """Replace the file at `path` whole: written beside it, then renamed, so a crash leaves the old
    file or the new one, never part of one. `data`: str or bytes, or a function that writes the file
    at the path it is given (safetensors' save_file; a figure's savefig, told its format). The temporary file is
    created anew, so the result has the usual mode 0o666 & ~umask (0644), never the mode of a
    leftover from a crash. (gpt2.py, which imports nothing of the project, writes its export the same
    way; data/formats.py streams a download into a temporary file and renames it.) A writer that
    raises leaves no temporary file behind, and the old file (if any) as it was."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
    except BaseException:  # removed, then raised as it is
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run per directory

LOCK_FILE = ".lock"
_held_locks = []  # (out_dir, lock file's fd, out_dir's fd or None) of the run directories this process holds


def lock_run_dir(out_dir, log=print):
    """Rank 0, before anything else is written: an exclusive lock on out_dir for the whole run, so
    that two launches on one directory cannot interleave their checkpoints and metrics.

    The lock is flock() on out_dir/.lock, which the kernel releases when the process ends, however
    it ends; the file also names its holder (host, pid, start time) for the message a second launch
    gets. A holder left in the file by a process that is gone (killed) is reported and replaced. On
    several nodes out_dir must be on a shared filesystem (README); a holder on another host cannot
    be checked from here, so it is refused with what to do.

    Deleting .lock must not let a second launch in: the directory itself is flock()ed too, which no
    file operation inside it undoes; where a filesystem cannot lock a directory (NFS emulates flock
    with byte-range locks, which need a file open for writing), check_lock_held() finds a .lock that
    is no longer the file this run locked before every save, and the run stops instead of writing.
    """
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        dir_fd = lock_directory(out_dir)  # first: a launch refused here creates nothing in out_dir
    except BlockingIOError:
        raise ConfigError(f"out_dir {out_dir!r} is in use by another run ({_describe(_read_holder_at(path))}); "
                          "wait for it to end or use another out_dir") from None
    except OSError as err:
        raise ConfigError(f"out_dir {out_dir!r} is not writable ({err})") from err
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        _close(dir_fd)
        raise ConfigError(f"out_dir {out_dir!r} is not writable ({err})") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        _close(dir_fd)
        raise ConfigError(f"out_dir {out_dir!r} is in use by another run ({_describe(holder)}); wait for it to end "
                          "or use another out_dir") from None
    holder = _read_holder(fd)
    if holder and holder.get("host") != socket.gethostname():
        os.close(fd)
        _close(dir_fd)
        raise ConfigError(f"out_dir {out_dir!r} is locked by a run on another machine ({_describe(holder)}), "
                          f"which cannot be checked from here. If that run has ended, delete {path}")
    if holder:
        log(f"{path}: the run that held it ({_describe(holder)}) is no longer running (killed?); taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _held_locks.append((out_dir, fd, dir_fd))


def _close(fd):
    if fd is not None:
        os.close(fd)


def _read_holder_at(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # deleted while its run is live: no holder to name
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def lock_directory(out_dir):
    """flock() on the directory itself: its fd, or None where the filesystem cannot lock a directory.
    BlockingIOError (another run holds it) goes to the caller."""
    dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        raise
    except OSError:  # EBADF/ENOLCK (NFS): check_lock_held() guards this run's writes instead
        os.close(dir_fd)
        return None
    return dir_fd


def check_lock_held(out_dir):
    """Rank 0, before each save, where out_dir itself could not be locked (NFS): out_dir/.lock is
    still the file this run locked. If it was deleted or replaced, another launch may be writing
    here: stop rather than write beside it. (With the directory locked, no other launch gets in.)"""
    for held_dir, fd, dir_fd in _held_locks:
        if held_dir != out_dir or dir_fd is not None:
            continue
        path = os.path.join(out_dir, LOCK_FILE)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        locked = os.fstat(fd)
        if now is None or (now.st_dev, now.st_ino) != (locked.st_dev, locked.st_ino):
            raise TrainingStopped(f"{path} was deleted or replaced while this run held it: another launch may be "
                                  "writing to this out_dir, so this run stops without writing more")


def held_run_dirs() -> list[str]:
    """The run directories this process holds locked, in the order it locked them."""
    return [held_dir for held_dir, _, _ in _held_locks]


def unlock_run_dirs(keep=0):
    """Release the locks this process took after its first `keep` (the kernel would on exit;
    in-process runs need it now): a run inside frontier.py releases its own, not the frontier's.
    The holder is cleared first, so the next launch finds no stale holder to report."""
    while len(_held_locks) > keep:
        _, fd, dir_fd = _held_locks.pop()
        os.ftruncate(fd, 0)
        os.close(fd)
        if dir_fd is not None:
            os.close(dir_fd)


def _read_holder(fd):
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:  # a lock file torn by a crash: no holder to name
        return None


def _describe(holder):
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def check_shared_out_dir(out_dir, device):
    """Collective: every rank sees the file rank 0 just wrote in out_dir, or the run stops. Ranks on
    several nodes share checkpoints, the reference cache and the lock through out_dir, so it must be
    on a shared filesystem; a node-local disk would otherwise show up as a hang at the first load."""
    if dist.get_world_size() == 1:
        return
    token = on_rank0(_write_token, device, f"write to {out_dir}", out_dir)
    path = os.path.join(out_dir, f".shared_check_{token}")
    seen = torch.tensor([float(os.path.isfile(path))], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(path)
    if not seen.item():
        raise ConfigError(f"out_dir {out_dir!r} is not on a filesystem that every rank sees (a file rank 0 wrote "
                          f"there is missing on {socket.gethostname()} or another node); multi-node runs need "
                          "out_dir on a shared filesystem")


def _write_token(out_dir):
    token = os.urandom(8).hex()
    write_atomic(os.path.join(out_dir, f".shared_check_{token}"), token)
    return token


# ----------------------------------------------------------------------------- files

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
        self.path = metrics_file(cfg.out_dir)
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


def read_metrics(out_dir, log=print) -> list[dict]:
    """Every record of out_dir/metrics.jsonl in order ([] when the file does not exist). A torn last
    line (the disk filled or the process died during an append) is dropped with a message; any other
    unreadable line is an error naming the file and line."""
    path = metrics_file(out_dir)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # every complete append ends with a newline
    records = []
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("expected a JSON object with an integer 'step'")
        except ValueError as err:  # also JSONDecodeError, UnicodeDecodeError
            if number == len(lines) and not data.endswith(b"\n"):
                log(f"{path}: dropping the torn last line {number} (an append was interrupted)")
                continue
            raise DataError(f"{path}:line {number}: not a metrics record ({err}); fix or remove the line") from err
        records.append(record)
    return records


def keep_metrics_until(out_dir, step: int, log=print):
    """Keep metrics.jsonl's records up to `step` (the checkpoint resumed from); step 0, a fresh
    start, drops an earlier attempt's lines (its step-0 eval is recorded again)."""
    if os.path.exists(metrics_file(out_dir)):
        kept = [record for record in read_metrics(out_dir, log) if step > 0 and record["step"] <= step]
        write_atomic(metrics_file(out_dir), "".join(json.dumps(r) + "\n" for r in kept))
    elif step > 0:
        log(f"{metrics_file(out_dir)} is missing: the records of steps 0-{step} are gone; it goes on from step {step}")


def write_config(cfg: TrainConfig):
    write_atomic(config_file(cfg.out_dir), dump_config(cfg))


# ----------------------------------------------------------------------------- the before/after samples

def samples_table(prompts, before, after, before_rewards=None, after_rewards=None):
    """Markdown: prompt, continuation before and after training, and, with a reward, each one's
    score and the means."""
    cell = lambda text: text.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    score = lambda value: "" if value is None else f"{value:.3f}"  # noqa: E731
    with_reward = before_rewards is not None or after_rewards is not None
    before_rewards = before_rewards or [None] * len(prompts)
    after_rewards = after_rewards or [None] * len(prompts)
    if not with_reward:
        rows = ["| Prompt | Before training (reference) | After training (policy) |", "| --- | --- | --- |"]
        rows += [f"| {cell(p)} | {cell(b)} | {cell(a)} |" for p, b, a in zip(prompts, before, after)]
        return "\n".join(rows) + "\n"
    rows = ["| Prompt | Before training (reference) | reward | After training (policy) | reward |",
            "| --- | --- | --- | --- | --- |"]
    rows += [f"| {cell(p)} | {cell(b)} | {score(rb)} | {cell(a)} | {score(ra)} |"
             for p, b, rb, a, ra in zip(prompts, before, before_rewards, after, after_rewards)]
    rows.append(f"| **mean reward** | | {score(mean_of(before_rewards))} | | {score(mean_of(after_rewards))} |")
    return "\n".join(rows) + "\n"


def mean_of(values):
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


NOT_SAMPLED = "(not sampled before training: n_samples was smaller at the start)"


def before_entries(value) -> list:
    """[[sample, reward], ...] of one prompt in samples_before.json, as this version writes it, or as
    an older one did: [sample, reward], or the sample alone (a run resumed across versions)."""
    if isinstance(value, str):
        return [[value, None]]
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return [value]
    return [entry for entry in value if isinstance(entry, list) and len(entry) == 2] if isinstance(value, list) else []


def write_samples_before(cfg, prompts, before, rewards=None):
    """samples_before.json maps each prompt's text to its continuations (and rewards) before training,
    [[sample, reward], ...] in the order the prompt recurs (dataset: text samples one prompt,
    <|endoftext|>, n times), so that the table at the end finds them even if n_samples (and so the
    prompts) changed on a resume."""
    texts = [decode(p) for p in prompts]
    rewards = rewards or [None] * len(texts)
    by_prompt = {}
    for text, sample, reward in zip(texts, before, rewards):
        by_prompt.setdefault(text, []).append([sample, reward])
    write_atomic(samples_before_file(cfg.out_dir), json.dumps(by_prompt))
    write_atomic(samples_file(cfg.out_dir), samples_table(texts, before, ["(training)"] * len(before)))


def write_samples_table(cfg, prompts, after, log, after_rewards=None):
    path = samples_before_file(cfg.out_dir)
    before_by_prompt = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                before_by_prompt = json.loads(f.read())
        except ValueError as err:  # damaged: the table is still written, its "before" column says so
            log(f"{path}: damaged ({err}); the table's before column is left empty")
    if not isinstance(before_by_prompt, dict):
        before_by_prompt = {}
    texts = [decode(p) for p in prompts]
    seen = {}  # prompt -> how many of its rows came before: its k-th row takes its k-th sample
    before = []
    for text in texts:
        entries, k = before_entries(before_by_prompt.get(text)), seen.get(text, 0)
        seen[text] = k + 1
        before.append(entries[k] if k < len(entries) else [NOT_SAMPLED, None])
    before_texts = [sample for sample, _ in before]
    before_rewards = [reward for _, reward in before]
    with_reward = after_rewards is not None or any(r is not None for r in before_rewards)
    table = samples_table(texts, before_texts, after, before_rewards if with_reward else None, after_rewards)
    write_atomic(samples_file(cfg.out_dir), table)
    log("\n" + table)
