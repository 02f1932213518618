"""Stage (a) of the GPU check (bench/gpu_check.py): what the machine is, and the rates of the parts
the training step is made of, in about 30 s. Each section is added to OUT_JSON as soon as it is
measured (the file is replaced whole), so a kill keeps what was done.

    python3 bench/gpu_probe.py OUT_JSON [--device cuda|cpu] [--commit SHA]

- versions: python, torch, CUDA, cuDNN, NCCL, transformers; the device's name, capability, memory;
- a one-process all-reduce on the trainer's backend (nccl on CUDA, gloo on CPU), in a subprocess under
  a timeout with NCCL_DEBUG=WARN; its output goes to comm.log beside OUT_JSON. Every bf16 path of the
  trainer runs FSDP, which needs it: if it fails, the check runs only what does not;
- the best bf16 matmul rate (8192^2), the device-to-device copy rate, host-to-device pinned and pageable;
- the LM head on the scored rows, 3072 rows x d by d x 50257 for each GPT-2 width: an fp32 GEMM with
  TF32 off and on, bf16 in with fp32 out (torch.mm's out_dtype), and plain bf16; and forward +
  backward of gpt2.scored_logits for each of the trainer's lm_head_precision choices.
On CPU (the dry run) the sizes shrink and what needs CUDA is recorded as null.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gpt2 import HEAD_PRECISIONS, PRESETS, scored_logits  # noqa: E402
from train.run_dir import write_atomic  # noqa: E402

VOCAB = 50257
COMM_TIMEOUT_S = 90


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_json", help="where the results go (written after every section)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the dry run's small sizes")
    parser.add_argument("--commit", default=None, help="the commit being checked (the copy may have no .git)")
    parser.add_argument("--_all_reduce", default=None, help=argparse.SUPPRESS)  # internal: the subprocess
    args = parser.parse_args(argv)
    if args._all_reduce:
        return all_reduce_once(args._all_reduce)
    device = torch.device(args.device)
    results = {"versions": versions(device, args.commit)}
    sections = [("communication", lambda: communication(device, os.path.dirname(os.path.abspath(args.out_json)))),
                ("rates", lambda: rates(device)), ("lm_head", lambda: lm_head(device))]
    for name, measure in sections:
        write_atomic(args.out_json, json.dumps(results, indent=2))
        start = time.perf_counter()
        results[name] = measure()
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name}: {json.dumps(results[name])[:600]}", flush=True)
    write_atomic(args.out_json, json.dumps(results, indent=2))
    return 0 if results["communication"]["ok"] else 3


# ----------------------------------------------------------------------------- sections

def versions(device, commit):
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers_version,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
            "memory_bytes": props.total_memory if cuda else None,
            "device_count": torch.cuda.device_count() if cuda else 0, "cpu_count": os.cpu_count()}


def communication(device, out_dir):
    """The trainer's one-process group and one all-reduce, in a subprocess: a hang is cut at the timeout."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    env = dict(os.environ, NCCL_DEBUG="WARN", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    command = [sys.executable, os.path.abspath(__file__), "unused", f"--_all_reduce={backend}"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=COMM_TIMEOUT_S)
        exit_code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        exit_code = "timeout"
        output = f"timed out after {COMM_TIMEOUT_S} s\n" + (err.stdout or b"").decode() + (err.stderr or b"").decode()
    with open(os.path.join(out_dir, "comm.log"), "w") as f:
        f.write(output)
    return {"backend": backend, "ok": exit_code == 0 and "all_reduce ok" in output, "exit": exit_code,
            "wall_s": round(time.perf_counter() - start, 2), "log_tail": output[-1500:]}


def all_reduce_once(backend):
    """Subprocess: what parallel.setup_distributed does as a plain python, then one all-reduce."""
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    x = torch.full((1 << 20,), 2.0, device=device)
    dist.all_reduce(x)
    ok = bool((x == 2.0).all())
    dist.destroy_process_group()
    print("all_reduce ok" if ok else "all_reduce gave a wrong value", flush=True)
    return 0 if ok else 1


def rates(device):
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = best_time(lambda: a @ b, device)
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = best_time(lambda: dst.copy_(src), device)
    out = {"matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
           "matmul_flops_per_s": 2 * n ** 3 / matmul_s,
           "device_copy_bytes_per_s": 2 * copy_bytes / copy_s}  # read + write
    if cuda:
        host = torch.empty(256 << 20, dtype=torch.uint8)
        pinned = host.pin_memory()
        out["host_to_device_pageable_bytes_per_s"] = host.numel() / best_time(lambda: src[:host.numel()].copy_(host), device)
        out["host_to_device_pinned_bytes_per_s"] = host.numel() / best_time(
            lambda: src[:host.numel()].copy_(pinned, non_blocking=True), device)
    return out


def lm_head(device):
    """The scored rows' LM head at each GPT-2 width: seconds and TFLOP/s per variant."""
    cuda = device.type == "cuda"
    rows, widths = (3072, [PRESETS[s]["n_embd"] for s in PRESETS]) if cuda else (16, [768])
    out = {"rows": rows, "vocab": VOCAB, "widths": {}}
    for d in widths:
        x = torch.randn(rows, d, device=device, dtype=torch.bfloat16)
        w = torch.randn(VOCAB, d, device=device, dtype=torch.bfloat16) * 0.02
        flops = 2 * rows * d * VOCAB
        variants = {"fp32": lambda: fp32_gemm(x, w, "ieee"), "bf16": lambda: x @ w.t()}
        if cuda:
            variants["tf32"] = lambda: fp32_gemm(x, w, "tf32")
            variants["bf16_in_fp32_out"] = lambda: torch.mm(x, w.t(), out_dtype=torch.float32)
        repeats = 5 if cuda else 1  # on CPU (the dry run) the path is what is checked, not the figures
        forward = {}
        for name, fn in variants.items():
            seconds = best_time(fn, device, repeats)
            forward[name] = {"ms": round(seconds * 1e3, 3), "tflops_per_s": round(flops / seconds / 1e12, 3)}
        train = {}  # forward + backward of what the trainer runs (3 GEMMs)
        for precision in HEAD_PRECISIONS:
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            seconds = best_time(lambda: scored_logits(xg, wg, precision).sum().backward(), device, repeats)
            train[precision] = {"ms": round(seconds * 1e3, 3), "tflops_per_s": round(3 * flops / seconds / 1e12, 3)}
        out["widths"][str(d)] = {"forward_gemm": forward, "scored_logits_forward_backward": train}
    return out


def fp32_gemm(x, w, precision):
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision  # this process only: the probe
    try:
        return x.float() @ w.float().t()
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def best_time(fn, device, repeats=5):
    """The fastest of `repeats` timed calls, after one untimed (allocations, kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
