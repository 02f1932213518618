"""Faults injected for real — SIGKILL mid-run and mid-save, flipped and truncated bytes, crafted
pickles, a poisoned batch, an unwritable run directory, bad data — and what must survive them."""
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import warm
from conftest import ROOT
from data.batches import epoch_order
from gpt2 import GPT, GPTConfig
from test_fsdp_train import (ENV, TINY, assert_same_losses, assert_weights_close, final_weights, run_in_process,
                             train_losses)

pytestmark = pytest.mark.slow

LONG_RUN = ["--max_steps=12", "--ckpt_every=2", "--sharding=none"]


def command(out_dir, *extra):
    """`python fsdp_train.py ...` for tests/warm.py (which starts the interpreter) or, after it, torchrun."""
    return ["fsdp_train.py", *TINY, f"--out_dir={out_dir}", *extra]


def run(out_dir, *extra, env=None):
    """Its own process (started warm): for runs that kill themselves, and those compared bitwise with them."""
    return warm.run(command(out_dir, *extra), env=env or ENV, timeout=300)


def start(out_dir, *extra):
    """Its own process (started warm) whose output, stderr merged, is read as it runs."""
    return warm.popen(command(out_dir, *extra))


def run_here(out_dir, *extra):
    """In this process (fsdp_train.run), for runs that end by themselves."""
    return run_in_process([*TINY, f"--out_dir={out_dir}", *extra])


def kill_when_logged(process, pattern, target_pid=None):
    """Read the run's output until `pattern` appears, then SIGKILL target_pid (default: the process)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            os.kill(target_pid() if target_pid else process.pid, signal.SIGKILL)
            break
    else:
        raise AssertionError("the run ended before the fault was injected:\n" + "".join(seen[-20:]))
    rest, _ = process.communicate(timeout=300)
    return "".join(seen) + rest


def assert_bitwise_equal(a_dir, b_dir):
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(a_dir) == train_losses(b_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(out_dir, *LONG_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def test_sigkill_mid_training_then_relaunch_finishes_bitwise_equal(uninterrupted, tmp_path):
    process = start(tmp_path, *LONG_RUN)
    kill_when_logged(process, r"^step 5/12")
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "final").exists()
    relaunched = run(tmp_path, *LONG_RUN)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert re.search(r"resumed from .*step_0000(04|06|08|10) at step", relaunched.stdout)
    # same losses at every step (no pair seen twice or skipped) and the same final weights, bit for bit
    assert_bitwise_equal(tmp_path, uninterrupted)


def torchrun(argv):
    """torchrun itself, two workers on this machine: for what the agent does (stop the other worker,
    forward SIGTERM); its relaunches, plain two-rank runs, start warm."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(torchrun_pid):
    """A worker process of a torchrun launch (a child running fsdp_train.py)."""
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if "fsdp_train.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return int(pid)
    raise AssertionError("no torchrun worker found")


def test_killed_rank_of_a_two_rank_run_then_relaunch_finishes_equal(uninterrupted, tmp_path):
    """SIGKILL one of two torchrun workers mid-run; torchrun stops the other; the same command run
    again resumes and ends where the uninterrupted run ends: the same loss at every step and the
    same weights, to the 1e-5 at which two ranks equal one process (a pair skipped or seen twice,
    or optimizer state lost, would be far outside it)."""
    faulty = torchrun(command(tmp_path, "--max_steps=12", "--ckpt_every=2"))
    kill_when_logged(faulty, r"^step 5/12", target_pid=lambda: worker_pid(faulty.pid))
    assert faulty.returncode != 0 and not (tmp_path / "final").exists()
    returncodes, output = warm.wait_ranks(warm.ranks(command(tmp_path, "--max_steps=12", "--ckpt_every=2")))
    assert returncodes == [0, 0], output[-3000:]
    assert re.search(r"resumed from .*step_0000(04|06|08|10) at step", output)
    assert_same_losses(train_losses(tmp_path), train_losses(uninterrupted), n_steps=12)
    assert_weights_close(final_weights(tmp_path), final_weights(uninterrupted))


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_from_it(uninterrupted, tmp_path):
    killed = run(tmp_path, *LONG_RUN, env=dict(ENV, GPT2_DPO_FAULT="kill_during_save:4"))
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp_step_000004").is_dir()  # the partial save is there...
    assert not (checkpoints / "step_000004").exists()  # ...but never under a complete name
    assert (checkpoints / "step_000002" / "train_state.json").exists()
    relaunched = run(tmp_path, *LONG_RUN)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert "removing incomplete checkpoint" in relaunched.stdout and ".tmp_step_000004" in relaunched.stdout
    assert "step_000002 at step 2" in relaunched.stdout
    assert not (checkpoints / ".tmp_step_000004").exists()
    assert_bitwise_equal(tmp_path, uninterrupted)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finished_run")
    result = run_here(out_dir, "--max_steps=4", "--ckpt_every=2", "--sharding=none")
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


@pytest.fixture
def run_with_checkpoints(finished_run, tmp_path):
    """A copy of a finished 4-step run (checkpoints at steps 2 and 4), for one test to damage."""
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def test_a_checkpoint_is_12_bytes_per_parameter(finished_run):
    """fp32 weights and AdamW's two moments, each parameter once: the tied LM head is wte, not a
    second copy (at gpt2-xl that copy was 0.3 GiB of every checkpoint)."""
    from safetensors import safe_open
    with safe_open(str(finished_run / "final" / "model.safetensors"), "pt") as f:  # transformers' layout, head omitted
        n_params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    shards = sum(p.stat().st_size for p in (finished_run / "checkpoints" / "step_000004").glob("*.distcp"))
    assert 12 * n_params <= shards <= 12 * n_params * 1.01 + 65536, (shards, 12 * n_params)


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    ("flip", "sha256 differs from the one recorded at save time (corrupted)"),
    ("truncate", "the checkpoint recorded"),
])
def test_damaged_checkpoint_is_named_and_nothing_is_overwritten(run_with_checkpoints, damage, message):
    out_dir = run_with_checkpoints
    shard = next((out_dir / "checkpoints" / "step_000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    before = snapshot(out_dir)
    result = run_here(out_dir, "--max_steps=6", "--ckpt_every=2", "--sharding=none")
    assert result.returncode != 0
    assert str(shard) in result.stderr and message in result.stderr
    assert snapshot(out_dir) == before


def test_checkpoint_of_another_model_size_is_refused(run_with_checkpoints):
    before = snapshot(run_with_checkpoints)
    result = run_here(run_with_checkpoints, "--max_steps=6", "--sharding=none", "--n_embd=48")
    assert result.returncode != 0
    assert "step_000004: checkpoint does not match this run's config: n_embd: checkpoint 32 vs this run 48" \
        in result.stderr
    assert snapshot(run_with_checkpoints) == before


# ----------------------------------------------------------------------------- crafted checkpoints

class CreatesMarker:
    """Unpickled by plain pickle, this opens (creates) `marker`: the command a crafted file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def crafted(run_with_checkpoints, tmp_path):
    """A run to craft, its last checkpoint, that checkpoint's metadata (read with plain pickle: our own
    file) and the path of a marker file."""
    checkpoint_dir = run_with_checkpoints / "checkpoints" / "step_000004"
    with open(checkpoint_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    return run_with_checkpoints, checkpoint_dir, metadata, tmp_path / "MARKER"


def write_crafted(checkpoint_dir, metadata):
    """Write metadata, then recompute every size and sha256 in train_state.json, as anyone can."""
    (checkpoint_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    state = json.loads((checkpoint_dir / "train_state.json").read_text())
    state["files"] = {name: [(checkpoint_dir / name).stat().st_size,
                             hashlib.sha256((checkpoint_dir / name).read_bytes()).hexdigest()]
                      for name in state["files"]}
    (checkpoint_dir / "train_state.json").write_text(json.dumps(state))


def test_crafted_checkpoint_metadata_runs_nothing(crafted):
    out_dir, checkpoint_dir, metadata, marker = crafted
    metadata.planner_data["extra"] = CreatesMarker(marker)  # a checkpoint that loads, plus one object
    write_crafted(checkpoint_dir, metadata)
    before = snapshot(out_dir)
    result = run_here(out_dir, "--max_steps=6", "--ckpt_every=2", "--sharding=none")
    assert result.returncode == 2
    assert f"{checkpoint_dir / '.metadata'}: refused to unpickle io.open" in result.stderr
    assert not marker.exists() and snapshot(out_dir) == before
    pickle.loads((checkpoint_dir / ".metadata").read_bytes())  # the reference: plain pickle runs it
    assert marker.exists()


def test_crafted_optimizer_value_in_a_shard_runs_nothing(crafted):
    """DCP stores non-tensor values (the optimizer's lr, betas...) as pickles in the .distcp shard and
    reads them with torch.load(weights_only=False): point one at a crafted pickle appended to the shard."""
    out_dir, checkpoint_dir, metadata, marker = crafted
    index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    shard = checkpoint_dir / metadata.storage_data[index].relative_path
    payload = io.BytesIO()
    torch.save(CreatesMarker(marker), payload)
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=shard.stat().st_size,
                                                       length=len(payload.getvalue()))
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    write_crafted(checkpoint_dir, metadata)
    before = snapshot(out_dir)
    result = run_here(out_dir, "--max_steps=6", "--ckpt_every=2", "--sharding=none")
    assert result.returncode == 2
    assert f"{shard}: refused to unpickle the entry optim.param_groups.0.lr: it asks for io.open" in result.stderr
    assert not marker.exists() and snapshot(out_dir) == before
    payload.seek(0)
    torch.load(payload, weights_only=False)  # the reference: DCP's own reading runs it
    assert marker.exists()


def test_truncated_weight_file_is_named(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).init_weights(seed=0)
    model.save_pretrained(tmp_path / "weights")
    weights = tmp_path / "weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_here(tmp_path / "run", f"--init_from={tmp_path / 'weights'}")
    assert result.returncode != 0
    assert f"{weights}: not a readable safetensors file" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- non-finite loss

POISONED_POSITION = 30


@pytest.fixture
def poisoned_setup(tmp_path):
    """A model whose position-30 embedding is finite but huge (+-3e38: layer norm's mean of it
    overflows), and data where only one pair is long enough to reach position 30: the batch holding
    that pair is poisoned (its loss is NaN), no other is. The weights stay finite, so checkpoints of
    them may be saved."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)).init_weights(seed=0)
    with torch.no_grad():
        model.transformer.wpe.weight[POISONED_POSITION] = torch.tensor([3e38, -3e38] * 16)
    model.save_pretrained(tmp_path / "weights")
    lines = [{"prompt": f"Review {i}: the film was", "chosen": " good.", "rejected": " bad."} for i in range(64)]
    long_index = 37
    lines[long_index]["prompt"] = " ".join(["word"] * 28) + " and the film was"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    order = epoch_order(64, seed=0, epoch=0)
    poisoned_step = order.index(long_index) // 8 + 1  # batch_size 8
    args = [f"--init_from={tmp_path / 'weights'}", "--dataset=jsonl", f"--data_path={data}", "--eval_fraction=0",
            "--max_prompt_len=40", "--max_len=48", "--max_steps=8", "--ckpt_every=1", "--sharding=none"]
    return tmp_path, args, poisoned_step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(poisoned_setup):
    tmp_path, args, poisoned_step = poisoned_setup
    result = run_here(tmp_path / "run", *args)
    assert result.returncode == 1
    assert f"step {poisoned_step}: non-finite loss" in result.stdout
    assert "37" in result.stdout.split(f"step {poisoned_step}: non-finite loss")[1].split("\n")[0]  # names the pair
    assert f"stopping at step {poisoned_step}" in result.stderr
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    if poisoned_step > 1:
        assert checkpoints[-1].name == f"step_{poisoned_step - 1:06d}"
        state = json.loads((checkpoints[-1] / "train_state.json").read_text())
        assert state["step"] == poisoned_step - 1
    else:
        assert checkpoints == []
    assert not (tmp_path / "run" / "final").exists()


def test_non_finite_steps_can_be_skipped_up_to_a_bound(poisoned_setup):
    tmp_path, args, poisoned_step = poisoned_setup
    result = run_here(tmp_path / "run", *args, "--max_bad_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {poisoned_step}: non-finite loss" in result.stdout and "the update was not applied" in result.stdout
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    finite_except_poison = {k: v for k, v in weights.items() if k != "transformer.wpe.weight"}
    assert all(torch.isfinite(v).all() for v in finite_except_poison.values())
    wpe = weights["transformer.wpe.weight"]
    assert torch.isfinite(torch.cat([wpe[:POISONED_POSITION], wpe[POISONED_POSITION + 1:]])).all()


def test_non_finite_loss_on_one_of_two_ranks_stops_both(poisoned_setup):
    """The poisoned pair lands on one rank's slice: both ranks must skip together and stop together
    (a rank stopping alone would leave the other waiting in a collective until a timeout)."""
    tmp_path, args, poisoned_step = poisoned_setup
    returncodes, output = warm.wait_ranks(warm.ranks(command(tmp_path / "run", *[a for a in args if a != "--sharding=none"])))
    assert returncodes == [1, 1], output[-3000:]  # each rank stopped by itself: none was left waiting, to be killed
    assert f"step {poisoned_step}: non-finite loss" in output
    assert output.count(f"stopping at step {poisoned_step}") == 2  # each rank says so, none hangs


# ----------------------------------------------------------------------------- refused before training

def test_unwritable_run_directory_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_here(blocker / "run")
    assert result.returncode == 2
    assert "is not writable" in result.stderr and str(blocker / "run") in result.stderr


def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n' * 2 + '{"prompt": "a", "chosen": \n')
    result = run_here(tmp_path / "run", "--dataset=jsonl", f"--data_path={data}")
    assert result.returncode == 2
    assert str(data) in result.stderr and "line 3" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_warm_started_run_resumes_on_its_sft_model_and_never_redoes_it_under_a_checkpoint(tmp_path):
    """The SFT stage (sft_steps) is DPO's reference: a relaunch reuses out_dir/sft/ bit for bit, and
    a relaunch whose SFT settings differ is refused before anything is trained or overwritten."""
    first = run_here(tmp_path, "--sft_steps=3", "--ckpt_every=2", "--max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    sft_weights = (tmp_path / "sft" / "model.safetensors").read_bytes()
    resumed = run_here(tmp_path, "--sft_steps=3", "--ckpt_every=2", "--max_steps=4")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert "sft step" not in resumed.stdout  # the SFT stage was reused, not redone
    changed = run_here(tmp_path, "--sft_steps=3", "--sft_lr=0.01", "--max_steps=4")
    assert changed.returncode == 2 and "holds DPO checkpoints" in changed.stderr, changed.stderr[-2000:]
    assert (tmp_path / "sft" / "model.safetensors").read_bytes() == sft_weights


@pytest.mark.parametrize("flag, missing, message", [
    ("--wandb_log", "wandb", "--wandb_log needs Weights & Biases: pip install wandb"),
    ("--reward=vader", "vaderSentiment", "reward=vader needs vaderSentiment"),
])
def test_a_missing_optional_package_is_refused_before_anything_is_written(tmp_path, monkeypatch, flag, missing, message):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name, *a))
    result = run_here(tmp_path / "run", flag)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_nothing_is_unpickled_or_executed_from_files():
    """Weights are safetensors, configs yaml.safe_load, torch.load only with weights_only=True. The one
    unpickler is safe_dcp's, which resolves only an allow-list of globals, and every DCP load goes
    through it (the crafted-checkpoint tests above show it refusing)."""
    sources = [p for p in ROOT.rglob("*.py") if "tests" not in p.parts]
    assert len(sources) >= 8
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        pickle_uses = set(re.findall(r"\bpickle\.\w+|\bpickle\b(?= import)", text))
        if path.name == "safe_dcp.py":
            assert pickle_uses == {"pickle.Unpickler", "pickle.UnpicklingError"} and "def find_class" in text, path
            assert re.search(r"dcp\.load\(state, storage_reader=CheckedMetadataReader\(.*\n"
                             r".*planner=WeightsOnlyLoadPlanner", text), path
        else:
            assert "import pickle" not in text and not pickle_uses, path
            assert not re.search(r"\bdcp\.load\(|FileSystemReader", text), path
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, path
        assert "trust_remote_code" not in text, path
        for loader in re.findall(r"class (\w+)\(yaml\.(\w+)\)", text):  # a loader of our own extends the safe one
            assert loader[1] == "SafeLoader", (path, loader)
    from train.config import _NoAliasLoader
    assert issubclass(_NoAliasLoader, yaml.SafeLoader)


# ----------------------------------------------------------------------------- one writer, nothing lost

def test_a_second_launch_on_a_directory_in_use_is_refused_and_a_dead_holder_is_replaced(tmp_path):
    """Two launches on one out_dir: the second exits 2 naming the directory and the running one,
    and changes nothing; once the first is killed (SIGKILL: no clean-up), the next launch reports
    the dead holder and takes the directory over."""
    first = start(tmp_path, "--max_steps=40", "--sharding=none")
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            break
    before = snapshot(tmp_path)
    second = run_here(tmp_path, "--max_steps=2", "--sharding=none")
    after = snapshot(tmp_path)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert second.returncode == 2, "".join(seen[-20:]) + second.stderr
    assert f"out_dir '{tmp_path}' is in use by another run (pid {first.pid} on host {socket.gethostname()}" \
        in second.stderr
    assert {p for p in after if "metrics" not in p.name} == {p for p in before if "metrics" not in p.name}
    third = run_here(tmp_path, "--max_steps=2", "--sharding=none")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"(pid {first.pid} on host" in third.stdout and "is no longer running" in third.stdout
    assert json.loads((tmp_path / ".lock").read_bytes() or b"null") is None  # released, holder cleared


def test_an_interrupted_re_save_of_a_step_loses_no_checkpoint(run_with_checkpoints):
    """A save of a step that already has a checkpoint completes the new one in .tmp_step_N, moves
    the old aside to .old_step_N, then renames: killed between the renames, only those two are
    left. The next launch puts the old one back and resumes from it (it used to delete both)."""
    checkpoints = run_with_checkpoints / "checkpoints"
    (checkpoints / "step_000004").rename(checkpoints / ".old_step_000004")
    shutil.copytree(checkpoints / ".old_step_000004", checkpoints / ".tmp_step_000004")
    result = run_here(run_with_checkpoints, "--max_steps=6", "--ckpt_every=2", "--sharding=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recovering" in result.stdout and "resumed from" in result.stdout and "step_000004 at step 4" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000006"]


def test_a_torn_metrics_line_is_dropped_and_a_bad_one_named(run_with_checkpoints):
    metrics = run_with_checkpoints / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"step": 5, "loss": 0.6')  # the disk filled during an append
    result = run_here(run_with_checkpoints, "--max_steps=6", "--sharding=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{metrics}: dropping the torn last line" in result.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
    metrics.write_text(complete.replace("\n", "\nnot json\n", 1))
    result = run_here(run_with_checkpoints, "--max_steps=8", "--sharding=none")
    assert result.returncode == 2 and f"{metrics}:line 2: not a metrics record" in result.stderr


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: a tmpfs with room for one checkpoint (about 25 MB here) but not two."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=36m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = run_here(small / "run", "--max_steps=6", "--ckpt_every=2", "--sharding=none", "--n_samples=0")
        assert result.returncode == 1
        assert "could not write checkpoint" in result.stderr and "No space left on device" in result.stderr
        kept = small / "run" / "checkpoints" / "step_000002"
        assert (kept / "train_state.json").exists() and not (small / "run" / "checkpoints" / "step_000004").exists()
        from train.checkpoint import verify_checkpoint
        verify_checkpoint(str(kept))  # every file there with its recorded size and sha256
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_sigterm_saves_the_step_and_the_relaunch_loses_nothing(uninterrupted, tmp_path):
    process = start(tmp_path, *LONG_RUN)
    output = signal_when_logged(process, r"^step 5/12", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = int(re.search(r"stopped by SIGTERM after step (\d+)", output).group(1))
    assert stopped_at >= 5 and (tmp_path / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    relaunched = run(tmp_path, *LONG_RUN)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert f"at step {stopped_at}" in relaunched.stdout  # resumed where it stopped: no step lost
    assert_bitwise_equal(tmp_path, uninterrupted)


def test_sigterm_to_the_torchrun_agent_stops_both_ranks_after_a_save(uninterrupted, tmp_path):
    agent = torchrun(command(tmp_path, "--max_steps=12", "--ckpt_every=4"))
    output = signal_when_logged(agent, r"^step 5/12", signal.SIGTERM)
    stopped_at = int(re.search(r"stopped by SIGTERM after step (\d+)", output).group(1))
    assert output.count("stopped by SIGTERM") == 2  # each rank stopped after the same step, none hung
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    returncodes, output = warm.wait_ranks(warm.ranks(command(tmp_path, "--max_steps=12", "--ckpt_every=4")))
    assert returncodes == [0, 0], output[-3000:]
    assert f"at step {stopped_at}" in output
    assert_same_losses(train_losses(tmp_path), train_losses(uninterrupted), n_steps=12)
    assert_weights_close(final_weights(tmp_path), final_weights(uninterrupted))


def signal_when_logged(process, pattern, signum):
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            process.send_signal(signum)
            break
    rest, _ = process.communicate(timeout=300)
    return "".join(seen) + rest


# ----------------------------------------------------------------------------- finished, changed, overflowed

def test_a_finished_run_launched_again_touches_nothing_and_can_be_extended(run_with_checkpoints):
    before = snapshot(run_with_checkpoints)
    for max_steps in (4, 2):  # the same command; one that asks for fewer steps
        again = run_here(run_with_checkpoints, f"--max_steps={max_steps}", "--ckpt_every=2", "--sharding=none")
        assert again.returncode == 0 and "run complete" in again.stdout and "nothing to do" in again.stdout
        assert snapshot(run_with_checkpoints) == before
    extended = run_here(run_with_checkpoints, "--max_steps=6", "--ckpt_every=2", "--sharding=none", "--n_samples=4")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "at step 4" in extended.stdout and "step 6/6" in extended.stdout
    # n_samples changed from 2 to 4: the prompts sampled before training keep their samples, new ones say so
    table = (run_with_checkpoints / "samples.md").read_text()
    assert table.count("| ") >= 4 and "not sampled before training" in table
    assert json.loads((run_with_checkpoints / "checkpoints" / "step_000006" / "train_state.json").read_text())["step"] == 6


def test_samples_asked_for_only_on_resume_do_not_break_the_run(tmp_path):
    first = run_here(tmp_path, "--max_steps=2", "--ckpt_every=2", "--sharding=none", "--n_samples=0")
    assert first.returncode == 0 and not (tmp_path / "samples.md").exists()
    resumed = run_here(tmp_path, "--max_steps=4", "--sharding=none", "--n_samples=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not sampled before training" in (tmp_path / "samples.md").read_text()
    assert json.loads((tmp_path / "final" / "config.json").read_text())  # the export is this run's, at step 4
    assert max(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_weights_made_non_finite_by_an_update_are_never_saved(tmp_path):
    """lr 3e38 is finite, but Adam's first step size lr / (1 - beta1) overflows: the update turns the
    weights to inf/NaN while the step's loss and gradient were finite. No checkpoint holds them."""
    result = run_here(tmp_path, "--lr=3e38", "--max_steps=3", "--ckpt_every=1", "--sharding=none")
    assert result.returncode == 1
    assert "step 1: the weights are no longer finite" in result.stderr and "Last good checkpoint: none" in result.stderr
    assert not list(tmp_path.glob("checkpoints/step_*"))


# ----------------------------------------------------------------------------- runs that survive their users

def test_a_damaged_reference_cache_is_recomputed_not_trusted(tmp_path):
    """Zeroed values in reference_logps.safetensors, same shapes, key file untouched: the relaunch
    sees that the bytes no longer have the sha256 recorded with the key, recomputes, and ends with
    the losses of a run that was never interrupted (they were 1.34 against 0.59 when it was trusted)."""
    from safetensors.torch import save_file
    cached = ["--sharding=none", "--precompute_reference=true", "--ckpt_every=2"]
    assert run_here(tmp_path / "whole", *cached).returncode == 0
    assert run_here(tmp_path / "cut", *cached, "--max_steps=2").returncode == 0
    cache = tmp_path / "cut" / "reference_logps.safetensors"
    save_file({name: torch.zeros_like(t) for name, t in load_file(cache).items()}, cache)
    resumed = run_here(tmp_path / "cut", *cached)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "do not have the sha256 recorded" in resumed.stdout and "recomputing" in resumed.stdout
    assert_same_losses(train_losses(tmp_path / "cut"), train_losses(tmp_path / "whole"))


def test_a_missing_metrics_file_is_said_on_resume(tmp_path):
    assert run_here(tmp_path, "--sharding=none", "--ckpt_every=2", "--max_steps=2").returncode == 0
    (tmp_path / "metrics.jsonl").unlink()
    resumed = run_here(tmp_path, "--sharding=none", "--ckpt_every=2")
    assert resumed.returncode == 0 and "metrics.jsonl is missing: the records of steps 0-2 are gone" in resumed.stdout


def test_a_change_to_any_option_the_sft_stage_reads_redoes_it(tmp_path):
    """Warmup, clipping and the rest shape the SFT model too: with --warmup_steps and --grad_clip
    changed, out_dir/sft/ is not reused (it was, silently), and with DPO checkpoints on it the
    relaunch is refused naming out_dir."""
    assert run_here(tmp_path, "--sft_steps=3", "--ckpt_every=2", "--max_steps=2").returncode == 0
    refused = run_here(tmp_path, "--sft_steps=3", "--max_steps=4", "--warmup_steps=1", "--grad_clip=0.1")
    assert refused.returncode == 2 and "holds DPO checkpoints" in refused.stderr, refused.stderr[-2000:]
    for derived in ("checkpoints", "final", "metrics.jsonl"):  # a new DPO stage on the same out_dir
        shutil.rmtree(tmp_path / derived) if (tmp_path / derived).is_dir() else (tmp_path / derived).unlink()
    redone = run_here(tmp_path, "--sft_steps=3", "--max_steps=2", "--warmup_steps=1", "--grad_clip=0.1")
    assert redone.returncode == 0 and "sft step 3/3" in redone.stdout, redone.stderr[-2000:]


def test_sigterm_during_the_sft_warm_start_saves_it_and_the_relaunch_resumes_it(tmp_path):
    """Stopped within one SFT step (it was 178 s later, after the whole stage and the DPO set-up):
    a checkpoint of the stage, exit 143; the relaunch resumes the stage there and ends with the SFT
    model of a run that was never stopped, bit for bit."""
    sft = ["--sft_steps=24", "--max_steps=1", "--sharding=none", "--n_samples=0", "--kl_samples=0"]
    process = start(tmp_path / "stopped", *sft)
    output = signal_when_logged(process, r"^sft step 3/24", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = int(re.search(r"during the SFT warm start after step (\d+)/24", output).group(1))
    assert 3 <= stopped_at < 24 and "training:" not in output  # before DPO was set up
    assert (tmp_path / "stopped" / "sft" / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    resumed = run(tmp_path / "stopped", *sft)  # processes, as the stopped one: the same threads, the same sums
    assert resumed.returncode == 0 and "SFT warm start resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert not (tmp_path / "stopped" / "sft" / "checkpoints").exists()
    assert run(tmp_path / "whole", *sft).returncode == 0
    stopped, whole = (load_file(tmp_path / run / "sft" / "model.safetensors") for run in ("stopped", "whole"))
    assert stopped.keys() == whole.keys() and all(torch.equal(stopped[k], whole[k]) for k in whole)


def test_sigterm_during_the_stages_before_training_stops_there(tmp_path):
    """A signal that arrives during the first samples and eval is acted on when they end, before the
    first step (it was acted on after the first step)."""
    process = start(tmp_path, "--sharding=none", "--n_samples=2", "--eval_every=0")
    output = signal_when_logged(process, r"^model: ", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert re.search(r"stopped by SIGTERM after (building the models|the first samples and eval), before training",
                     output) and not re.search(r"^step \d", output, re.M)


def test_a_damaged_train_state_falls_back_to_the_older_checkpoint(tmp_path):
    """train_state.json truncated, or without its identity: passed over, said, and the run resumes
    from the intact checkpoint before it (it was a raw traceback)."""
    run_dir = tmp_path / "run"
    assert run_here(run_dir, "--sharding=none", "--ckpt_every=2", "--max_steps=4").returncode == 0
    shutil.copytree(run_dir, tmp_path / "as_saved")
    for damage in (lambda text: text[:len(text) // 2], lambda text: json.dumps(
            {k: v for k, v in json.loads(text).items() if k != "identity"})):
        state = run_dir / "checkpoints" / "step_000004" / "train_state.json"
        state.write_text(damage(state.read_text()))
        resumed = run_here(run_dir, "--sharding=none", "--ckpt_every=2", "--max_steps=6")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "passed over for an older checkpoint" in resumed.stdout, resumed.stdout[-2000:]
        assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
        shutil.rmtree(run_dir)
        shutil.copytree(tmp_path / "as_saved", run_dir)
    # keeping one checkpoint: the damaged step 4 neither counts nor pushes out the steps saved after it
    state = run_dir / "checkpoints" / "step_000004" / "train_state.json"
    state.write_text(state.read_text()[:100])
    resumed = run_here(run_dir, "--sharding=none", "--ckpt_every=1", "--keep_checkpoints=1", "--max_steps=6")
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000006"]


def test_a_damaged_sft_json_is_one_line_not_a_traceback(tmp_path):
    assert run_here(tmp_path, "--sft_steps=3", "--ckpt_every=2", "--max_steps=2").returncode == 0
    (tmp_path / "sft" / "sft.json").write_text('{"sft_steps": 3, "trunc')
    refused = run_here(tmp_path, "--sft_steps=3", "--max_steps=4")
    assert refused.returncode == 2 and "sft.json is missing, damaged" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr


def test_a_kill_after_the_last_checkpoint_never_leaves_a_partial_export(tmp_path):
    """"Complete" means the export matches the last step. Killed as the export starts (for real), or
    with final/ left as a crash leaves it: never a final/ of some files only (it once held only the
    weights, and AutoTokenizer then encoded text to []), and the relaunch makes it again from the last
    checkpoint without training, once, then calls the run complete."""
    from transformers import AutoTokenizer
    process = start(tmp_path, "--sharding=none", "--ckpt_every=2")
    kill_when_logged(process, r"^exporting ")
    final = tmp_path / "final"
    assert not final.exists() or json.loads((final / "export.json").read_text())["step"] == 4
    export_won_the_race = final.exists()  # the kill landed after the export's last rename: it is complete
    metrics_before = (tmp_path / "metrics.jsonl").read_text()

    def finished(already_complete=False):
        result = run_here(tmp_path, "--sharding=none", "--ckpt_every=2")
        assert result.returncode == 0, result.stderr[-2000:]
        said = "run complete" if already_complete else "finishing from it, without training"
        assert said in result.stdout and not re.search(r"^step \d", result.stdout, re.M), result.stdout[-2000:]
        assert json.loads((final / "export.json").read_text()) == {"step": 4}
        assert AutoTokenizer.from_pretrained(final)("The movie was").input_ids == [464, 3807, 373]
        assert (tmp_path / "metrics.jsonl").read_text() == metrics_before  # no second final eval line
        assert not (tmp_path / "final.tmp").exists() and not (tmp_path / "final.old").exists()

    finished(already_complete=export_won_the_race)  # after the real kill
    shutil.move(final, tmp_path / "final.tmp")  # killed mid-export: a partial folder beside no final/
    (tmp_path / "final.tmp" / "README.md").unlink()
    (tmp_path / "final.tmp" / "vocab.json").unlink()
    finished()
    (final / "export.json").write_text(json.dumps({"step": 2}))  # an export of an earlier step
    finished()
    complete = run_here(tmp_path, "--sharding=none", "--ckpt_every=2")
    assert complete.returncode == 0 and "run complete" in complete.stdout


def test_deleting_the_lock_file_does_not_admit_a_second_writer(tmp_path):
    """rm out_dir/.lock while a run is live, then the same command again: refused (it took a new lock
    and both wrote steps 10-40 into metrics.jsonl). The directory itself is locked too."""
    process = start(tmp_path, "--sharding=none", "--max_steps=2000")
    try:
        for line in process.stdout:
            if line.startswith("step 2/"):
                break
        (tmp_path / ".lock").unlink()
        second = run_here(tmp_path, "--sharding=none", "--max_steps=2000")
        assert second.returncode == 2 and "is in use by another run" in second.stderr, second.stderr[-2000:]
    finally:
        process.kill()
        process.wait()


def test_a_refused_launch_leaves_the_live_runs_lock_alone(tmp_path):
    """With out_dir itself locked, a second launch after `rm .lock` is refused before it creates any
    file, so the live run's guard before its next save still passes (a new .lock there would have
    stopped the live run instead)."""
    from errors import ConfigError
    from train.run_dir import check_lock_held, lock_run_dir, unlock_run_dirs
    lock_run_dir(str(tmp_path))
    try:
        (tmp_path / ".lock").unlink()
        with pytest.raises(ConfigError, match="is in use by another run"):
            lock_run_dir(str(tmp_path))  # another open file description: refused as another process would be
        assert not (tmp_path / ".lock").exists()
        check_lock_held(str(tmp_path))
    finally:
        unlock_run_dirs()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_run_whose_lock_file_is_gone_stops_before_its_next_save(tmp_path, monkeypatch, how):
    """Where the directory cannot be locked (NFS, simulated: lock_directory finds no lock to take),
    the lock file's identity guards the writes: checked before each save, a deleted or replaced .lock
    stops the run instead of a second writer's."""
    from errors import TrainingStopped
    from train import run_dir
    from train.run_dir import check_lock_held, lock_run_dir, unlock_run_dirs
    monkeypatch.setattr(run_dir, "lock_directory", lambda out_dir: None)
    lock_run_dir(str(tmp_path))
    try:
        check_lock_held(str(tmp_path))
        (tmp_path / ".lock").unlink()
        if how == "replaced":
            (tmp_path / ".lock").write_text("{}")
        with pytest.raises(TrainingStopped, match="deleted or replaced while this run held it"):
            check_lock_held(str(tmp_path))
    finally:
        unlock_run_dirs()


def test_a_finished_run_leaves_no_process_group_thread_behind(tmp_path):
    """After run() returns, the gloo threads of its process group are joined. They were not: the FSDP
    modules' reference cycles kept the group alive past destroy_process_group(), and a finished
    two-rank run sometimes died at the interpreter's exit with SIGABRT ("terminate called without an
    active exception"), torchrun then reporting exit 1 for a complete run. Counted as this process's
    threads, before and after a second run (the first starts torch's own thread pools)."""
    def threads():
        return len(os.listdir("/proc/self/task"))

    assert run_here(tmp_path / "first", "--max_steps=1").returncode == 0
    before = threads()
    assert run_here(tmp_path / "second", "--max_steps=1").returncode == 0
    assert threads() == before
