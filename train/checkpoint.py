"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): complete or invisible.

Layout under <out_dir>/checkpoints/:
    step_000100/          a complete checkpoint: DCP shards + .metadata + train_state.json
    .tmp_step_000200/     being written (or left by a crash): never resumed from, removed later
    .old_step_000100/     a complete checkpoint being replaced by a re-save of its step: put back
                          or removed at the next start (recover_replaced_checkpoints)

Every rank writes its shards into the .tmp directory; after DCP's own barrier rank 0 writes
train_state.json (with the size and sha256 of every file) and renames the directory. A rename
within one filesystem is atomic, so a reader sees either no step_000200 or a whole one; the
checksums catch files truncated or altered afterwards. Only tensors and JSON are stored.

Fault injection for tests/test_faults.py: GPT2_DPO_FAULT=kill_during_save:STEP makes rank 0
SIGKILL itself after the shards of STEP are written and before the rename.
"""
import hashlib
import json
import os
import re
import shutil
import signal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from errors import CheckpointError, TrainingStopped
from gpt2 import TIED_HEAD, TIED_TO
from train import safe_dcp
from train.rank0 import on_rank0
from train.run_dir import checkpoints_dir

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(out_dir):
    return checkpoints_dir(out_dir)


def step_dirs(out_dir, step) -> tuple[str, str]:
    """(the complete checkpoint's directory, the one it is written in first) of a step."""
    root = checkpoint_root(out_dir)
    return os.path.join(root, f"step_{step:06d}"), os.path.join(root, f".tmp_step_{step:06d}")


def complete_checkpoints(out_dir) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, "train_state.json")) and os.path.isfile(
                os.path.join(path, ".metadata")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(out_dir, log=None) -> str | None:
    """The newest complete checkpoint whose train_state.json is readable (its step and identity); one
    that is not (truncated, edited) is passed over, said through log, for the older one before it."""
    for _, path in reversed(complete_checkpoints(out_dir)):
        problem = train_state_problem(path)
        if problem is None:
            return path
        if log is not None:
            log(f"{path}/train_state.json {problem}: passed over for an older checkpoint (left in place)")
    return None


def train_state_problem(path) -> str | None:
    try:
        with open(os.path.join(path, "train_state.json"), "rb") as f:
            state = json.loads(f.read())
    except ValueError as err:  # also UnicodeDecodeError
        return f"is not valid JSON ({err})"
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("identity"), dict)
            and isinstance(state.get("files"), dict)):
        return "lacks its step, identity or file list"
    return None


def saved_identity(path) -> dict:
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)["identity"]


def recover_replaced_checkpoints(out_dir, log=print):
    """Rank 0, before the checkpoints are listed: a save of a step that already had a checkpoint
    moves the old one to .old_step_N only once its replacement is complete in .tmp_step_N, then
    renames. A crash between the renames leaves .old_step_N: put it back if step_N is missing, or
    remove it if step_N is there (the replacement finished)."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        if not name.startswith(".old_step_"):
            continue
        old, final = os.path.join(root, name), os.path.join(root, name[len(".old_"):])
        if os.path.isdir(final):
            log(f"removing {old}: its replacement {final} is complete")
            shutil.rmtree(old)
        else:
            log(f"recovering {final} from {old} (a re-save of that step was interrupted)")
            os.rename(old, final)


def remove_partial_checkpoints(out_dir, log=print):
    """Delete .tmp_* directories left by a crash during a save or a deletion (rank 0 only)."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        if name.startswith(".tmp_"):
            log(f"removing incomplete checkpoint {os.path.join(root, name)} (a save was interrupted)")
            shutil.rmtree(os.path.join(root, name), ignore_errors=False)


def weights_are_finite(model, device) -> bool:
    """Collective: no NaN or inf in any rank's shard of the model's parameters."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]).all().float().reshape(1).to(device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_checkpoint(out_dir, step, model, optimizer, train_state: dict, keep: int, device):
    """Collective: every rank calls it. train_state is JSON (step, data position, loss scale...).
    Weights that are no longer finite are never saved: the run stops, naming the last good one."""
    if not weights_are_finite(model, device):
        newest = complete_checkpoints(out_dir)
        raise TrainingStopped(f"step {step}: the weights are no longer finite (an update overflowed: is lr too "
                              f"large?), so they were not saved. Last good checkpoint: "
                              f"{newest[-1][1] if newest else 'none'}")
    final, tmp = step_dirs(out_dir, step)
    on_rank0(make_empty_dir, device, f"create {tmp}", tmp)
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state.pop(TIED_HEAD, None)  # the same tensor as wte: stored once (it was 0.3 GiB more at gpt2-xl)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # ends with a barrier
    except (Exception, CheckpointException) as err:  # DCP gathers every rank's write errors (disk full...)
        raise RuntimeError(f"could not write checkpoint {tmp}: {failure_text(err)}{space_problem(tmp, model_state, optim_state)}"
                           "; the last complete checkpoint is untouched") from err
    on_rank0(complete_checkpoint, device, f"complete checkpoint {final}", out_dir, step, train_state, keep)
    return final


def failure_text(err) -> str:
    """What went wrong, in one line: DCP's CheckpointException (a BaseException, so `except
    Exception` misses it) holds each rank's exception; the OSError under it ("No space left on
    device") says more than the error it caused ("unexpected pos 704 vs 598")."""
    failures = [exc for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else [err]
    texts = []
    for exc in failures:
        cause = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        shown = cause if cause is not None else exc
        texts.append(f"{type(shown).__name__}: {shown}")
    return "; ".join(sorted(set(texts)))


def space_problem(directory, *states) -> str:
    """" (No space left on device: ...)" when the filesystem cannot hold this rank's shards: torch's
    writer reports a full disk as "unexpected pos 704 vs 598", without the OSError."""
    needed = 0
    for state in states:
        for value in _tensors(state):
            local = value.to_local() if hasattr(value, "to_local") else value
            needed += local.numel() * local.element_size()
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return ""
    return (f" (No space left on device: {free / 2**20:.1f} MiB free on the filesystem of {directory}, this rank's "
            f"shards need about {needed / 2**20:.1f} MiB)")


def _tensors(state):
    if isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)
    elif isinstance(state, torch.Tensor):
        yield state


def make_empty_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def complete_checkpoint(out_dir, step, train_state: dict, keep: int):
    """Rank 0, after every rank's shards are written: train_state.json with every file's size and
    sha256, then the rename that makes the checkpoint visible; then old ones are deleted."""
    root = checkpoint_root(out_dir)
    final, tmp = step_dirs(out_dir, step)
    if os.environ.get("GPT2_DPO_FAULT") == f"kill_during_save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    files = {name: file_fingerprint(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(dict(train_state, files=files), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    replaced = os.path.join(root, f".old_step_{step:06d}")
    if os.path.isdir(final):  # the same step saved again: its replacement is complete, move it aside
        os.rename(final, replaced)  # (a crash here is undone by recover_replaced_checkpoints)
    os.rename(tmp, final)
    if os.path.isdir(replaced):
        shutil.rmtree(replaced)
    # The `keep` newest readable checkpoints stay, and always this one (a stale checkpoint of a higher
    # step must not push it out); one whose train_state.json is damaged is neither counted nor deleted.
    readable = [(s, path) for s, path in complete_checkpoints(out_dir) if train_state_problem(path) is None]
    kept = {path for _, path in readable[-keep:]} | {final}
    for old_step, old in readable:
        if old in kept:
            continue
        deleting = os.path.join(root, f".tmp_deleting_step_{old_step:06d}")
        os.rename(old, deleting)  # invisible first, so a crash mid-deletion leaves no half checkpoint
        shutil.rmtree(deleting)


def file_fingerprint(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return [os.path.getsize(path), digest.hexdigest()]


def verify_checkpoint(path):
    """Refuse to resume from a checkpoint unless every file listed in train_state.json is there with
    its size and sha256; the error names the file."""
    with open(os.path.join(path, "train_state.json")) as f:
        expected = json.load(f).get("files", {})
    for name, (size, digest) in expected.items():
        problem = file_problem(os.path.join(path, name), size, digest)
        if problem:
            raise CheckpointError(f"cannot resume: {problem}. Move the checkpoint away to resume from an older "
                                  "one, or use another out_dir.")


def file_problem(file, size, digest) -> str | None:
    if not os.path.isfile(file):
        return f"{file}: missing from the checkpoint"
    actual_size, actual_digest = file_fingerprint(file)
    if actual_size != size:
        return f"{file}: {actual_size} bytes, the checkpoint recorded {size} (truncated or overwritten)"
    if actual_digest != digest:
        return f"{file}: sha256 differs from the one recorded at save time (corrupted)"
    return None


def load_checkpoint(path, model, optimizer) -> dict:
    """Collective. Loads model and optimizer shards in place; returns train_state."""
    with open(os.path.join(path, "train_state.json")) as f:
        train_state = json.load(f)
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state.pop(TIED_HEAD, None)  # stored once, as wte
    state = {"model": model_state, "optim": optim_state}
    try:
        safe_dcp.load(state, path)  # dcp.load, unpickling nothing but plain data
    except CheckpointError:  # a crafted file, refused by name
        raise
    except (Exception, CheckpointException) as err:  # name the checkpoint and what to do
        raise RuntimeError(f"{path}: could not load this checkpoint ({failure_text(err)}). "
                           "Was it written with another model size or config? Delete it to start over, "
                           "or point out_dir elsewhere.") from err
    state["model"][TIED_HEAD] = state["model"][TIED_TO]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return train_state


def saved_step(path) -> int:
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)["step"]


def check_compatible(path, expected: dict, hints: dict | None = None):
    """Refuse a checkpoint whose run identity (model shape, data, objective...) differs from this
    run's, naming what differs; hints[key] says what a difference in `key` means."""
    with open(os.path.join(path, "train_state.json")) as f:
        saved = json.load(f)["identity"]
    differs = [f"{key}: checkpoint {saved.get(key)!r} vs this run {value!r}"
               + (f" ({hints[key]})" if key in (hints or {}) else "")
               for key, value in expected.items() if saved.get(key) != value]
    if differs:
        raise CheckpointError(f"{path}: checkpoint does not match this run's config: " + "; ".join(differs) +
                         ". Use another out_dir to start a new run.")

