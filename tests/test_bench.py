"""bench/throughput.py: the script runs end to end on a tiny shape and writes the fields the README
promises; its FLOP formula agrees with torch's FLOP counter; FSDP halves the per-rank training state;
--fsdp_memory runs the world sizes the GPUs allow; MFU's datasheet peaks; every option has a help text.
bench/memory_estimate.py: its state bytes against independent counts and the trainer's own tensors, its
activation measurement's trends, and its whole estimate against the tracked peak of the real step."""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import memory_estimate
import warm
from conftest import ROOT
from data.batches import PackedBatch
from gpt2 import GPTConfig
from train.config import TrainConfig

SCRIPT = ROOT / "bench" / "throughput.py"
TINY = ["--device=cpu", "--sizes=tiny", "--pairs=2", "--prompt_len=8", "--response_len=4", "--steps=10",
        "--warmup=1", "--threads=1"]
ROW_FIELDS = ("size", "impl", "tokens_per_s", "step_ms_median", "step_ms_min", "step_ms_max", "peak_mem_bytes",
              "rss_before_model_bytes", "mfu_vs_measured_matmul_peak", "mfu_vs_datasheet_peak",
              "model_flops_per_step", "loss_first", "loss_last")


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *extra, expect_failure=False):
    """`python bench/throughput.py TINY EXTRA`, started warm (tests/warm.py: its workers, the processes
    it measures, start as the script starts them, fresh)."""
    result = warm.run([str(SCRIPT), *TINY, f"--results_dir={tmp_path}", f"--json={tmp_path / 'out.json'}", *extra],
                      timeout=300)
    assert result.returncode == (1 if expect_failure else 0), result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "out.json") as f:
        return json.load(f), result.stdout


@pytest.mark.slow
def test_tiny_run_writes_every_row_field(tmp_path):
    results, stdout = run_script(tmp_path)
    assert [(r["size"], r["impl"]) for r in results["rows"]] == [("tiny", "ours"), ("tiny", "transformers")]
    assert results["complete"] is True
    assert "tiny ours: " in stdout and "tokens/s" in stdout  # each row's line, printed as it was measured
    for row in results["rows"]:
        assert not row.get("error"), row.get("error")
        assert all(k in row for k in ROW_FIELDS), [k for k in ROW_FIELDS if k not in row]
        # CPU: neither a measured bf16 matmul peak nor a datasheet one to divide by
        assert row["mfu_vs_measured_matmul_peak"] is None and row["mfu_vs_datasheet_peak"] is None
        assert len(row["step_ms_all"]) == 10
        times = sorted(row["step_ms_all"])  # rounded to 0.01 ms
        assert row["step_ms_median"] == pytest.approx((times[4] + times[5]) / 2, abs=0.01)
        assert row["tokens_per_step"] == 2 * 2 * (8 + 4)
        assert math.isclose(row["tokens_per_s"], row["tokens_per_step"] / (row["step_ms_median"] / 1e3), rel_tol=1e-9)
        assert row["peak_mem_bytes"] > row["rss_before_model_bytes"] > 0
        # the reference starts equal to the policy, so DPO's first loss is log 2; then it trains
        assert abs(row["loss_first"] - math.log(2)) < 1e-5 and row["loss_last"] < row["loss_first"]
    ours, transformers = results["rows"]
    assert results["ratios"][0]["size"] == "tiny"
    assert results["ratios"][0]["speedup"] == pytest.approx(ours["tokens_per_s"] / transformers["tokens_per_s"])
    assert results["device"] == "cpu" and results["torch_version"] == torch.__version__
    assert "bench/throughput.py" in results["command"]
    assert len(list(tmp_path.glob("cpu-fp32-*.json"))) == 1  # the dated results file, in --results_dir
    assert "speedup" in stdout


@pytest.mark.slow
def test_a_killed_run_leaves_its_finished_rows_and_a_hung_worker_is_cut(tmp_path):
    """Each row is written as it is measured (the file replaced whole): killed while the second worker
    runs, the results hold the first row, marked incomplete. A worker past --worker_timeout is killed
    and its row says so."""
    out = tmp_path / "out.json"
    process = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--impls=ours,ours", f"--results_dir={tmp_path}",
                                f"--json={out}"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert [(r["size"], r["impl"]) for r in results["rows"]] == [("tiny", "ours")]  # of two asked for
    assert results["rows"][0]["tokens_per_s"] > 0

    results, stdout = run_script(tmp_path, "--impls=ours", "--worker_timeout=0.5", expect_failure=True)
    assert results["complete"] is True and "timed out after 0.5 s" in results["rows"][0]["error"]


@pytest.mark.parametrize("impl, prefix_sharing", [("ours", "on"), ("ours", "off"), ("transformers", "on")])
def test_flop_formula_matches_torch_flop_counter(impl, prefix_sharing):
    """The math SDPA backend runs attention as matmuls, so the counter sees every matmul of the step;
    the formula also counts biases and layer norms (2 FLOPs per parameter per token): ~0.2% more."""
    bench = load_bench()
    args = bench.parse_args(TINY + [f"--prefix_sharing={prefix_sharing}"])
    cpu = torch.device("cpu")
    if impl == "ours":  # the trainer broadcasts the initial config from rank 0: it needs a group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        build = bench.build_ours(args, "tiny", 0, cpu, None) if impl == "ours" else bench.build_transformers(
            args, "tiny", cpu)
        step, batch = build[0], bench.make_batch(args, impl, seed=0)
        assert isinstance(batch, PackedBatch) == (impl == "ours" and prefix_sharing == "on")
        step(batch)  # the first step creates AdamW's state
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step(batch)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    formula = bench.step_flops(bench.SIZES["tiny"], *bench.model_shape(args, impl))
    assert counter.get_total_flops() <= formula <= 1.01 * counter.get_total_flops()


@pytest.mark.slow
def test_fsdp_memory_two_ranks_hold_half_the_training_state(tmp_path):
    """Two ranks only (a world-size-1 launch would cost another torchrun): each rank's fp32 params,
    grads, AdamW moments and (fp32) reference are half of the unsharded model's bytes."""
    results, _ = run_script(tmp_path, "--fsdp_memory", "--world_sizes=2", "--impls=ours")
    (row,) = results["rows"]
    assert row["world_size"] == 2 and len(row["per_rank"]) == 2 and row["sharding"] == "full"
    unsharded = row["unsharded_param_bytes"]  # fp32
    for rank in row["per_rank"]:
        for key, copies in (("param_bytes", 1), ("grad_bytes", 1), ("optimizer_bytes", 2),
                            ("reference_param_bytes", 1)):
            assert abs(rank[key] - copies * unsharded / 2) <= 0.01 * unsharded, (key, rank[key], unsharded)


# ----------------------------------------------------------------------------- gpu_check.py: the staged GPU check

GPU_CHECK = ["bench/gpu_check.py"]  # started warm (tests/warm.py); its stages start their processes fresh


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_clearly_without_cuda(tmp_path):
    result = warm.run([*GPU_CHECK, str(tmp_path / "results")], timeout=120)
    assert result.returncode == 2
    assert "gpu_check: needs CUDA" in result.stderr and "nothing was run" in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_keeps_its_stage_order_time_boxes_and_eight_files(tmp_path):
    """The CPU dry run under a budget too short for every stage: the stages start in their order of
    value, each within its time box or what is left of the budget, a stage is skipped exactly when
    less than --min_start is left, and the output folder holds the four promised files (the lent
    machine returns at most 8). How many stages fit depends on the machine's speed (the probe takes
    4-9 s here), so nothing below counts on a stage after the probe running."""
    import tarfile
    from bench.gpu_check import STAGES
    out, budget, min_start = tmp_path / "out", 13, 3  # the probe alone took 8.8 s on a busy machine
    start = time.monotonic()
    result = warm.run([*GPU_CHECK, str(out), "--device=cpu", f"--budget={budget}", f"--min_start={min_start}",
                       "--commit=abc1234", f"--work_dir={tmp_path / 'work'}"], timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode in (0, 1), result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "stages.jsonl", "stages.tar.gz", "summary.json"]
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [s.name for s in STAGES]
    assert records[0]["status"] == "ok" and records[0]["communication_ok"] is True
    ran = [r for r in records if r["status"] != "skipped"]
    assert records[:len(ran)] == ran  # once the budget is spent, every later stage is skipped
    # no machine fits all seven in 13 s: the throughput stage's workers alone need more to import
    assert records[-1]["status"] == "skipped"
    for r in records:  # budget_left_s is rounded to 0.1 s: a stage skipped with 2.96 s left reads 3.0
        skipped = r["status"] == "skipped"
        assert r["budget_left_s"] < min_start + 0.05 if skipped else r["budget_left_s"] > min_start - 0.05, r
    for r in ran:  # each within min(its box, what was left of the budget), a second for process start-up
        assert r["timeout_s"] == pytest.approx(min(r["box_s"], r["budget_left_s"]), abs=0.2)
        assert sum(c.get("seconds", 0) for c in r["commands"]) <= r["timeout_s"] + 1
    assert elapsed < budget + 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["commit"] == "abc1234" and summary["versions"]["commit"] == "abc1234"
    probe = summary["stages"]["probe"]["probe"]
    assert probe["communication"]["backend"] == "gloo" and probe["rates"]["matmul_flops_per_s"] > 0
    assert set(probe["lm_head"]["widths"]["768"]["scored_logits_forward_backward"]) == {"bf16_in_fp32_out", "fp32"}
    with tarfile.open(out / "stages.tar.gz") as tar:
        names = tar.getnames()
    assert "stages/probe/probe.json" in names and "stages/probe/comm.log" in names


def test_gpu_check_starts_no_stage_with_less_than_min_start_left(tmp_path, capsys):
    """The skip rule at its edge, in this process: 2.5 s left under --min_start 3 skips the stage
    before anything is started or created (the dry run above sees the rule only where the machine's
    speed puts it); a budget not above --min_start is refused before anything is written."""
    from bench import gpu_check
    args = gpu_check.build_parser().parse_args([str(tmp_path / "out"), "--device=cpu", "--min_start=3"])
    logged = []
    record = gpu_check.run_stage(gpu_check.STAGES[0], args, str(tmp_path / "work"), time.monotonic() + 2.5, True,
                                 logged.append)
    assert record["status"] == "skipped" and record["reason"] == "2 s of the budget left", record
    assert 0 < record["budget_left_s"] < 3 and not logged and not (tmp_path / "work").exists()
    with pytest.raises(SystemExit) as refused:
        gpu_check.main([str(tmp_path / "out"), "--device=cpu", "--budget=3", "--min_start=3"])
    assert refused.value.code == 2 and "--budget 3 must be more than --min_start 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_check_only_one_stage_cut_at_its_time_box_with_its_workers(tmp_path):
    """--only runs one stage; a stage past its time (4 s: two throughput workers cannot even import
    torch and transformers in it) is killed with the processes it started, and recorded as a timeout."""
    result = warm.run([*GPU_CHECK, str(tmp_path), "--device=cpu", "--only=throughput_key", "--budget=4",
                       "--min_start=1", f"--work_dir={tmp_path / 'work'}"], timeout=120)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["status"]) for r in records] == [("throughput_key", "timeout")]
    assert records[0]["commands"][0]["seconds"] <= 5
    assert not processes_whose_command_has(f"results_dir={tmp_path / 'work'}")  # no worker outlived the stage


def processes_whose_command_has(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:  # gone meanwhile
            pass
    return found


# ----------------------------------------------------------------------------- throughput.py: options, GPUs

@pytest.mark.parametrize("parser", ["throughput", "memory_estimate", "frontier_time"])
def test_every_option_has_a_help_text(parser):
    """`--help` explains every option; only the internal plumbing (--_worker...) is hidden."""
    from bench import frontier_time
    p = {"throughput": load_bench().build_parser, "memory_estimate": memory_estimate.build_parser,
         "frontier_time": frontier_time.build_parser}[parser]()
    for action in p._actions:
        name = action.option_strings[-1]
        if action.help == argparse.SUPPRESS:
            assert name.startswith("--_"), f"{name} is hidden from --help"
        else:
            assert isinstance(action.help, str) and action.help.strip(), f"{name} has no help text"


def test_frontier_time_counts_each_runs_steps_and_evals_and_adds_their_measured_times(tmp_path):
    """bench/frontier_time.py on the offline frontier's config (smaller evals) with 48 stand-in prompts:
    each method's runs, steps and evaluations are as counted here by hand from the config, and a short
    run of the job (the reward model's, the cheapest; the others are only counted, --plan_only) gives
    its seconds per step, per evaluation and once per run."""
    from bench import frontier_time
    config = yaml.safe_load((ROOT / "config" / "frontier_demo.yaml").read_text())
    config["trainer"]["kl_samples"] = 8
    (tmp_path / "frontier.yaml").write_text(yaml.safe_dump(config))
    common = [f"--config_file={tmp_path / 'frontier.yaml'}", "--device=cpu", "--prompts=48", f"--results_dir={tmp_path}"]
    counted = frontier_time.main([*common, "--plan_only", "--jobs=dpo,unlikelihood,preferred_ft,ppo,ppo_gt"])
    # 48 prompts, round(0.2 x 48) = 10 held out: 38 train prompts, 6 pairs each (one best sample for
    # preferred-FT); 32 a step (PPO: prompts); evaluated at step 0, every eval_every steps and at the end
    assert {row["job"]: (row["runs"], row["steps"], row["evals"]) for row in counted["rows"]} == {
        "dpo": (8, 38 * 6 // 32 * 3, 3), "unlikelihood": (8, 38 * 6 // 32 * 3, 3),
        "preferred_ft": (2, 38 // 32 * 18, 2), "ppo": (8, 38 // 32 * 6, 2), "ppo_gt": (8, 38 // 32 * 6, 2)}
    result = frontier_time.main([*common, "--jobs=reward_model", "--steps=1", "--warmup=0", "--stand_in_reward",
                                 "--reward_shape=policy"])
    [row] = result["rows"]
    assert (row["job"], row["runs"], row["steps"], row["evals"]) == ("reward_model", 2, 38 * 6 // 32 * 4, 3)
    assert row["step_s"] > 0 and row["eval_s"] > 0 and row["overhead_s"] > 0
    saved = json.loads(next(tmp_path.glob("cpu-frontier_time-frontier-*.json")).read_text())
    assert saved["rows"] == result["rows"]


def test_fsdp_memory_world_sizes_follow_the_gpus():
    bench = load_bench()
    assert bench.usable_world_sizes([1, 2], "cuda", 1) == ([1], [
        "note: --world_sizes 2 skipped: this machine has 1 CUDA device(s) (torch.cuda.device_count()) and "
        "world size 2 needs 2"])
    assert bench.usable_world_sizes([1, 2, 8], "cuda", 8) == ([1, 2, 8], [])
    assert bench.usable_world_sizes([4], "cuda", 2)[0] == []
    assert bench.usable_world_sizes([1, 2, 4], "cpu", 0) == ([1, 2, 4], [])  # gloo: any number of processes
    assert bench.parse_args(TINY + ["--world_sizes=1,4"]).world_sizes == [1, 4]


def test_datasheet_peak_by_device_name():
    peak = load_bench().datasheet_peak_flops_per_s
    assert peak("NVIDIA H100 80GB HBM3") == 989.4e12  # the SXM part's name
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA H100 NVL") == 835.5e12
    assert peak("NVIDIA H200") == 989.4e12
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312e12
    assert peak("NVIDIA GeForce RTX 3060") is None and peak("Tesla T4") is None  # unknown: no MFU against it


# ----------------------------------------------------------------------------- memory_estimate.py

TINY_SHAPE = GPTConfig(n_layer=2, n_head=2, n_embd=64)  # full vocabulary: the LM head is real
SENTIMENT = dict(dataset="lm_human_preferences", data_path="sentiment", group_order=True, precision="bf16")


def test_estimate_state_bytes_against_independent_counts():
    """Parameters against transformers' own GPT2LMHeadModel (meta device) and gpt2's published count;
    bytes as the trainer holds them: fp32 weights, grads and two AdamW moments, a bf16 reference."""
    from transformers import GPT2Config, GPT2LMHeadModel
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        shape = GPTConfig.from_name(name)
        with torch.device("meta"):
            hf = GPT2LMHeadModel(GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd))
        assert memory_estimate.n_params(shape) == sum(p.numel() for p in hf.parameters())  # tied head once
    P = 124_439_808  # gpt2
    cfg = TrainConfig(init_from="gpt2", **SENTIMENT)
    state = memory_estimate.state_bytes(cfg, memory_estimate.model_shape(cfg), world_size=1, n_micro=1)
    assert state["n_params"] == P
    assert (state["param_bytes"], state["grad_bytes"], state["optimizer_bytes"], state["reference_param_bytes"]) == (
        4 * P, 4 * P, 8 * P, 2 * P)
    sharded = memory_estimate.state_bytes(cfg, memory_estimate.model_shape(cfg), world_size=2, n_micro=2)
    assert (sharded["param_bytes"], sharded["optimizer_bytes"], sharded["reference_param_bytes"]) == (2 * P, 4 * P, P)
    assert sharded["grad_bytes"] == 4 * P  # accumulating: FSDP2 keeps the unsharded fp32 gradients
    for changes, reference_bytes in ((dict(reference_precision="fp32"), 4 * P), (dict(precompute_reference=True), 0),
                                     (dict(reference_free=True), 0)):
        other = dataclasses.replace(cfg, **changes)
        assert memory_estimate.state_bytes(other, GPTConfig.from_name("gpt2"), 1, 1)[
            "reference_param_bytes"] == reference_bytes, changes


def test_saved_activations_grow_with_length_and_shrink_with_checkpointing():
    """The saved-tensor hooks see more per block for longer rows, and checkpointing keeps only each
    block's input (the residual stream, bf16): n_embd * 2 bytes per position, plus the mask once."""
    short = TrainConfig(init_from="scratch", max_prompt_len=8, max_len=12, **SENTIMENT)
    long = dataclasses.replace(short, max_prompt_len=16, max_len=24)
    measure = memory_estimate.measure_activations
    plain_short, plain_long = measure(short, TINY_SHAPE, 3, False), measure(long, TINY_SHAPE, 3, False)
    checkpointed = measure(long, TINY_SHAPE, 3, True)
    assert plain_short["unit_positions"] == 8 + 4 * 4 and plain_long["unit_positions"] == 16 + 4 * 8
    assert plain_long["per_block_bytes_per_unit"] > 1.9 * plain_short["per_block_bytes_per_unit"]
    assert plain_long["first_block_bytes_per_unit"] > plain_short["first_block_bytes_per_unit"]
    assert checkpointed["per_block_bytes_per_unit"] == 48 * 64 * 2  # the block's bf16 input, nothing else
    assert checkpointed["per_block_bytes_per_unit"] < plain_long["per_block_bytes_per_unit"] / 4
    assert checkpointed["fixed_bytes"] == plain_long["fixed_bytes"] == 0  # bf16_in_fp32_out keeps no head copy
    fp32_head = measure(dataclasses.replace(long, lm_head_precision="fp32"), TINY_SHAPE, 3, True)
    assert fp32_head["fixed_bytes"] == 4 * 50257 * 64  # the head weight's fp32 copy, saved for backward


@pytest.mark.parametrize("micro_batch_size, n_micro, checkpointing", [(6, 1, False), (3, 2, True)])
def test_estimate_bounds_the_tracked_peak_of_the_real_step(micro_batch_size, n_micro, checkpointing):
    """The whole estimate against the trainer's own step (FSDP over one gloo process, bf16, CPU), whose
    live tensors are tracked op by op: above it, and by less than a quarter at this tiny width, where
    the LM head's rows are counted at their upper bound (at gpt2's shape: 0.5-3.5% above)."""
    cfg = TrainConfig(init_from="scratch", max_prompt_len=16, max_len=24, activation_checkpointing=checkpointing,
                      batch_size=micro_batch_size * n_micro, micro_batch_size=micro_batch_size, **SENTIMENT)
    measured = {ac: memory_estimate.measure_activations(cfg, TINY_SHAPE, 3, ac) for ac in (False, True)}
    estimate = memory_estimate.estimate(cfg, TINY_SHAPE, micro_batch_size, checkpointing, measured)
    tracked = memory_estimate.tracked_step_peak_bytes(cfg, TINY_SHAPE, 3, micro_batch_size, n_micro)
    assert tracked <= estimate["peak_bytes"] <= 1.25 * tracked, (estimate["peak_bytes"], tracked)
