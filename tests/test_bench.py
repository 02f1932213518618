"""bench/throughput.py: the script runs end to end on a tiny shape and writes the fields the README
promises; its FLOP formula agrees with torch's FLOP counter; FSDP halves the per-rank training state."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from data.batches import PackedBatch

SCRIPT = ROOT / "bench" / "throughput.py"
TINY = ["--device=cpu", "--sizes=tiny", "--pairs=2", "--prompt_len=8", "--response_len=4", "--steps=10",
        "--warmup=1", "--threads=1"]
ROW_FIELDS = ("size", "impl", "tokens_per_s", "step_ms_median", "step_ms_min", "step_ms_max", "peak_mem_bytes",
              "rss_before_model_bytes", "mfu", "model_flops_per_step", "loss_first", "loss_last")


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *extra):
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, f"--results_dir={tmp_path}",
                             f"--json={tmp_path / 'out.json'}", *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "out.json") as f:
        return json.load(f), result.stdout


@pytest.mark.slow
def test_tiny_run_writes_every_row_field(tmp_path):
    results, stdout = run_script(tmp_path)
    assert [(r["size"], r["impl"]) for r in results["rows"]] == [("tiny", "ours"), ("tiny", "transformers")]
    for row in results["rows"]:
        assert not row.get("error"), row.get("error")
        assert all(k in row for k in ROW_FIELDS), [k for k in ROW_FIELDS if k not in row]
        assert row["mfu"] is None  # CPU: there is no bf16 matmul peak to divide by
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_clearly_without_cuda(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "results")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gpu_check: needs CUDA" in result.stderr and "nothing was run" in result.stderr
    assert not (tmp_path / "results").exists()
