"""Results of bench/throughput.py: ratios against the targets, the printed table, the JSON files."""
import datetime
import json
import os
import re
import subprocess
import sys

import torch

from train.run_dir import write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratios(rows, fsdp_memory):
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        if fsdp_memory:
            by_world = {r["world_size"]: r for r in rows if r["size"] == size}
            for world, row in by_world.items():
                if world != 1 and 1 in by_world:
                    state = row["train_state_bytes"] / by_world[1]["train_state_bytes"]
                    out.append({"size": size, "world_size": world, "train_state_bytes_vs_world1": state,
                                "step_ms_vs_world1": row["step_ms_median"] / by_world[1]["step_ms_median"],
                                "meets_target_0.55": state <= 0.55})
            continue
        by_impl = {r["impl"]: r for r in rows if r["size"] == size and r.get("tokens_per_s")}
        if len(by_impl) == 2:
            ours, hf = by_impl["ours"], by_impl["transformers"]
            speedup = ours["tokens_per_s"] / hf["tokens_per_s"]
            mem_ratio = ours["peak_mem_bytes"] / hf["peak_mem_bytes"]
            above = [r["peak_mem_bytes"] - r["rss_before_model_bytes"] for r in (ours, hf)]
            out.append({"size": size, "speedup": speedup, "mem_ratio": mem_ratio,
                        # CPU: peak RSS minus the RSS of the process before it built anything
                        "mem_ratio_above_baseline": above[0] / above[1] if ours["device"] == "cpu" else None,
                        "meets_target_speedup_2x": speedup >= 2.0, "meets_target_mem_0.5x": mem_ratio <= 0.5})
    return out


def print_table(results):
    gib = 2 ** 30
    print(f"\n{results['device_name']} | torch {results['torch_version']} | {results['dtype']} | "
          f"{results['pairs']} pairs x ({results['prompt_len']}+{results['response_len']}) tokens | "
          f"{results['steps']} timed steps after {results['warmup']}")
    print(f"{'size':<12}{'impl':<14}{'world':>6}{'tokens/s':>11}{'step ms median [min, max]':>30}"
          f"{'peak mem GiB':>14}{'(before model)':>16}{'TFLOP/s':>9}{'MFU/matmul':>11}{'MFU/sheet':>10}")
    for r in results["rows"]:
        if r.get("error"):
            print(f"{r['size']:<12}{r['impl']:<14} failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        spread = f"{r['step_ms_median']:.0f} [{r['step_ms_min']:.0f}, {r['step_ms_max']:.0f}]"
        mfu_matmul, mfu_sheet = (f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-"
                                 for k in ("mfu_vs_measured_matmul_peak", "mfu_vs_datasheet_peak"))
        reference = r.get("reference_precision", r["precision"])
        impl = r["impl"] + (f"+ref {reference}" if reference != r["precision"] else "")
        print(f"{r['size']:<12}{impl:<14}{r['world_size']:>6}{r['tokens_per_s']:>11.1f}{spread:>30}"
              f"{r['peak_mem_bytes'] / gib:>14.2f}{r['rss_before_model_bytes'] / gib:>16.2f}"
              f"{r['model_flops_per_s'] / 1e12:>9.3f}{mfu_matmul:>11}{mfu_sheet:>10}")
    if results["device"] == "cuda":
        measured, sheet = results["peak_bf16_matmul_flops_per_s"], results["datasheet_bf16_dense_peak_flops_per_s"]
        print("MFU per GPU. MFU/matmul: against the best bf16 matmul rate measured in this run ("
              + (f"{measured / 1e12:.1f} TFLOP/s" if measured else "none") + "); MFU/sheet: against NVIDIA's "
              f"datasheet dense bf16 peak for {results['device_name']} ("
              + (f"{sheet / 1e12:.1f} TFLOP/s" if sheet else "unknown: not in the table") + ")")
    for q in results["ratios"]:
        if "speedup" in q:
            print(f"{q['size']}: ours vs transformers: speedup {q['speedup']:.2f}x (target >= 2), peak memory "
                  f"{q['mem_ratio']:.2f}x (target <= 0.5)")
        else:
            print(f"{q['size']}: world {q['world_size']} vs 1: per-rank params+grads+optimizer "
                  f"{q['train_state_bytes_vs_world1']:.3f}x (target <= 0.55), step time {q['step_ms_vs_world1']:.2f}x")
    if results["fsdp_memory"]:
        print(f"{'size':<12}{'world':>6}{'rank':>5}{'params MiB':>12}{'grads MiB':>11}{'optim MiB':>11}"
              f"{'ref MiB':>10}{'step ms':>10}")
        for r in results["rows"]:
            for rank, pr in enumerate(r.get("per_rank", [])):
                print(f"{r['size']:<12}{r['world_size']:>6}{rank:>5}{pr['param_bytes'] / 2**20:>12.1f}"
                      f"{pr['grad_bytes'] / 2**20:>11.1f}{pr['optimizer_bytes'] / 2**20:>11.1f}"
                      f"{pr['reference_param_bytes'] / 2**20:>10.1f}{pr['step_ms_median']:>10.0f}")


def git_state():
    """(commit, tracked files with uncommitted changes) of the checkout, or (None, None) outside git."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").split()[1::2]
        return git("rev-parse", "--short", "HEAD").strip(), dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def write_results(args, rows, defaults, complete=True):
    """Print the table and write the results JSON; `defaults` (the options' defaults) name the file.
    complete=False: the rows so far, written without the table while the run goes on (each file is
    replaced whole, so a kill never leaves half a file)."""
    try:
        from transformers import __version__ as transformers_version
    except ImportError:  # ours alone needs no transformers
        transformers_version = None
    ok = [r for r in rows if not r.get("error")]
    peaks = [r["matmul_peak_flops_per_s"] for r in ok if r.get("matmul_peak_flops_per_s")]
    bf16_peak = max(peaks) if args.device == "cuda" and peaks else None
    for r in ok:  # per GPU, against each peak; null on CPU and where a peak is unknown
        per_gpu = r["model_flops_per_s"] / r["world_size"]
        r["mfu_vs_measured_matmul_peak"] = per_gpu / bf16_peak if bf16_peak else None
        sheet = r.get("datasheet_peak_flops_per_s")
        r["mfu_vs_datasheet_peak"] = per_gpu / sheet if sheet else None
    sheets = {r.get("datasheet_peak_flops_per_s") for r in ok}
    sources = sorted({r["sources_sha1"] for r in ok})
    if len(sources) > 1:
        print(f"WARNING: the trainer's files changed during this run (sources_sha1 {sources}); the rows "
              "measured different code, so their ratios mean little: run it again", file=sys.stderr)
    commit, dirty = git_state()
    name = ok[0]["device_name"] if ok else args.device
    results = {"benchmark": "dpo_train_step", "device": args.device, "device_name": name, "dtype": args.dtype,
               "torch_version": torch.__version__, "transformers_version": transformers_version,
               "python_version": sys.version.split()[0],
               "command": " ".join([f"torchrun --nproc_per_node {args.world}" if args.world > 1 else "python",
                                    "bench/throughput.py", *args.argv]),
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": commit,
               "git_uncommitted_files": dirty, "sources_sha1": sources,
               "threads": args.threads or max(1, (os.cpu_count() or 1) // max(1, args.world)),
               "fsdp_memory": args.fsdp_memory, "pairs": args.pairs, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "steps": args.steps, "warmup": args.warmup,
               "prefix_sharing": args.prefix_sharing, "activation_checkpointing": args.activation_checkpointing,
               "compile": args.compile, "sharding": args.sharding, "seed": args.seed,
               "reference_dtype": args.reference_dtype,
               "peak_bf16_matmul_flops_per_s": bf16_peak,
               "datasheet_bf16_dense_peak_flops_per_s": sheets.pop() if len(sheets) == 1 else None,
               "datasheet_peak_source": ("NVIDIA datasheet, dense bf16 Tensor Core (bench/throughput.py "
                                         "DATASHEET_BF16_DENSE_FLOPS_PER_S)" if args.device == "cuda" and
                                         any(r.get("datasheet_peak_flops_per_s") for r in ok) else "unknown"),
               "flop_formula": "policy S*T*(6N+12LTd)+6(M+dV)H, reference S*T*(2N+4LTd)+2(M+dV)H; S rows of T "
                               "positions, H LM-head rows, M the last block's ln_2+MLP and ln_f (run at the H "
                               "rows only) (see bench/throughput.py docstring and bench/NOTES.md)",
               "complete": complete, "rows": rows}
    results["ratios"] = ratios(ok, args.fsdp_memory)
    if complete:
        print_table(results)
    device_slug = "cpu" if args.device == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    tags = "".join(t for t, on in (
        ("-fsdp_memory", args.fsdp_memory), (f"-world{args.world}", args.world > 1),
        ("-" + "+".join(args.impls), args.impls != defaults.impls and not args.fsdp_memory),
        ("-no_prefix_sharing", not args.prefix_sharing), ("-ac", args.activation_checkpointing),
        (f"-ref_{args.reference_dtype}", args.reference_dtype not in ("same", args.dtype)),
        ("-compile", args.compile), (f"-sharding_{args.sharding}", "--sharding" in " ".join(args.argv)),
        (f"-{args.pairs}x{args.prompt_len}+{args.response_len}",
         (args.pairs, args.prompt_len, args.response_len) != (defaults.pairs, defaults.prompt_len,
                                                              defaults.response_len))) if on)
    date = datetime.date.today().strftime("%Y%m%d")
    paths = [os.path.join(args.results_dir, f"{device_slug}-{args.dtype}{tags}-{date}.json")]
    paths += [args.json] if args.json else []
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, json.dumps(results, indent=2))
        if complete:
            print(f"wrote {path}")
    return 0 if len(ok) == len(rows) else 1
