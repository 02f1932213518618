"""The GPU check: everything this project measures on a GPU, in stages ordered by value, each
time-boxed from one overall budget, every result written as it arrives. Made for the lent GPU
machine (one H100/H200, torch 2.11, python3, no internet; 10 minutes a command, 15 in all with the
machine's start, 8 files back from its output folder).

    python3 bench/gpu_check.py "$OUT" --commit SHA               # all stages, 360 s budget
    python3 bench/gpu_check.py "$OUT" --commit SHA --only compile   # one stage again
    python3 bench/gpu_check.py OUT --device cpu --budget 40      # the CPU dry run (tests/test_bench.py)

Stages (estimated seconds on an H100/H200, box = the most a stage may take):
    probe            20 / 60   versions; a one-rank NCCL all-reduce (its log kept); bf16 matmul and copy
                               rates; the LM-head GEMM at 3072 rows in fp32 / TF32 / bf16-in fp32-out
    parity           40 / 90   tests/test_gpu.py: bf16 logits and log-probs against transformers, with
                               large logits; SDPA backends' gradients; the trainer's bf16 path vs fp32
    throughput_key   75 / 150  bench/throughput.py, ours and transformers, gpt2 and gpt2-xl, 64 pairs
    trainer          40 / 90   tests/test_gpu.py: the trainer's eager FSDP bf16 runs (the demo, gpt2 random)
    throughput_rest  50 / 120  the same for gpt2-medium and gpt2-large
    compile         150 / 180  throughput of gpt2 with --compile; the compiled trainer run, recompiles logged
    extras            - / 180  only in the time left: 8-pair rows, gpt2-xl with checkpointing, the demo
A stage starts only with at least --min_start seconds of the budget left (a --budget not
above --min_start is refused), and runs for at most its box or what is left. --only reruns one stage
without the probe, taking NCCL as working. If the NCCL probe fails, only what needs no process group
on CUDA runs (transformers' throughput, the model-level parity tests), and comm.log in the archive
holds NCCL's warnings.

What comes back in OUT_DIR, four files, each rewritten after every stage:
    summary.json    the headline numbers of every stage run so far
    stages.jsonl    one line per stage: status (ok / failed / timeout / skipped), exit codes, seconds
    log.txt         what this driver did, with each command
    stages.tar.gz   every stage's own files (logs, JSON, junit XML), re-packed after each stage
Nothing downloads (the hub's offline variables are set) and no optional package is needed: the runs
pass --reward= (vaderSentiment is not on the GPU image).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train.run_dir import write_atomic  # noqa: E402
LOG_CAP_BYTES = 1 << 20  # each command's log keeps its last MiB in the archive
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass
class Stage:
    name: str
    estimate_s: float | None  # on an H100/H200; None: whatever time is left
    box_s: float


STAGES = [Stage("probe", 20, 60), Stage("parity", 40, 90), Stage("throughput_key", 75, 150),
          Stage("trainer", 40, 90), Stage("throughput_rest", 50, 120), Stage("compile", 150, 180),
          Stage("extras", None, 180)]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="where the four result files go (created)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the dry run, the tiny size and short runs, for the stage logic and the time boxes")
    p.add_argument("--budget", type=float, default=360, help="seconds for all stages together")
    p.add_argument("--only", default=None, choices=[s.name for s in STAGES], help="run this stage alone")
    p.add_argument("--min_start", type=float, default=10, help="seconds of the budget a stage needs left to start")
    p.add_argument("--commit", default=None, help="the commit being checked (the GPU machine's copy has no .git)")
    p.add_argument("--work_dir", default=None,
                   help="where the stages write their files before they are archived (default: a new temporary "
                        "folder, outside out_dir, so out_dir holds four files)")
    return p


# ----------------------------------------------------------------------------- what each stage runs

def python():
    return sys.executable  # the interpreter this driver runs under: python3 on the GPU image


def sizes(args, names):
    return "tiny" if args.device == "cpu" else names


def throughput(args, work, sizes_list, timeout, *extra):
    """bench/throughput.py on this device; each worker may take a share of the stage's time."""
    n_workers = len(sizes_list.split(",")) * (1 if any(e.startswith("--impls=") and "," not in e for e in extra) else 2)
    shape = (["--pairs=2", "--prompt_len=8", "--response_len=4", "--warmup=1", "--threads=1"]
             if args.device == "cpu" else ["--pairs=64"])
    return [python(), "bench/throughput.py", f"--device={args.device}", f"--sizes={sizes_list}", *shape,
            f"--worker_timeout={max(20.0, timeout * 0.9 / n_workers * 1.5):.0f}", f"--results_dir={work}",
            f"--json={work}/throughput.json", *extra]


def gpu_tests(work, selection):
    return [python(), "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k", selection,
            f"--junitxml={work}/junit.xml"]


def stage_commands(stage, args, work, timeout, comm_ok):
    """[(label, argv, extra env)] of a stage; a reason (str) when it cannot run here."""
    env = {"GPU_CHECK_OUT": work}
    only_transformers = () if comm_ok else ("--impls=transformers",)  # ours needs a process group on CUDA
    if stage == "probe":
        commit = [f"--commit={args.commit}"] if args.commit else []
        return [("probe", [python(), "bench/gpu_probe.py", f"{work}/probe.json", f"--device={args.device}", *commit],
                 {})]
    if stage == "parity":
        selection = "parity or backends or large_logits" + (" or bf16_path" if comm_ok else "")
        return [("tests", gpu_tests(work, selection), env)]
    if stage == "throughput_key":
        return [("throughput", throughput(args, work, sizes(args, "gpt2,gpt2-xl"), timeout, *only_transformers), {})]
    if stage == "throughput_rest":
        return [("throughput", throughput(args, work, sizes(args, "gpt2-medium,gpt2-large"), timeout,
                                          *only_transformers), {})]
    if not comm_ok:
        return "the NCCL probe failed: the trainer needs a process group on CUDA"
    if stage == "trainer":
        return [("tests", gpu_tests(work, "training_runs and not compiled"), env)]
    if stage == "compile":
        return [("throughput", throughput(args, work, sizes(args, "gpt2"), timeout / 2, "--compile"), {}),
                ("tests", gpu_tests(work, "training_runs and compiled"), env | {"TORCH_LOGS": "recompiles"})]
    if stage == "extras":
        demo = [python(), "fsdp_train.py", "--config_file=config/demo.yaml", f"--device={args.device}", "--reward=",
                f"--out_dir={work}/demo"] + (["--precision=fp32", "--sharding=none", "--sft_steps=10",
                                              "--max_steps=2"] if args.device == "cpu" else [])
        eight = ["--pairs=8"] if args.device == "cuda" else []
        all_sizes = sizes(args, "gpt2,gpt2-medium,gpt2-large,gpt2-xl")
        return [("throughput_8_pairs", throughput(args, f"{work}/8_pairs", all_sizes, timeout / 3) + eight, {}),
                ("throughput_xl_checkpointing", throughput(args, f"{work}/xl_checkpointing", sizes(args, "gpt2-xl"),
                                                           timeout / 3, "--activation_checkpointing", "--impls=ours"),
                 {}),
                ("demo", demo, {})]
    raise ValueError(stage)


# ----------------------------------------------------------------------------- running a stage

def run_command(argv, env, timeout, log_path):
    """(exit code or "timeout", seconds). Its own process group, so a timeout kills its children too
    (throughput's workers, pytest's subprocesses)."""
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **OFFLINE, **env), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group ended between the timeout and the kill
                pass
            process.wait()
            exit_code = "timeout"
    keep_tail(log_path, LOG_CAP_BYTES)
    return exit_code, round(time.perf_counter() - start, 2)


def keep_tail(path, cap):
    if os.path.getsize(path) > cap:
        with open(path, "rb") as f:
            f.seek(-cap, os.SEEK_END)
            tail = f.read()
        with open(path, "wb") as f:
            f.write(b"[... cut: the last %d bytes follow]\n" % cap + tail)


def run_stage(stage, args, work_root, deadline, comm_ok, log):
    """One stage: its record for stages.jsonl."""
    budget_left = deadline - time.monotonic()
    record = {"stage": stage.name, "estimate_s": stage.estimate_s, "box_s": stage.box_s,
              "budget_left_s": round(budget_left, 1)}
    if budget_left < args.min_start:
        return record | {"status": "skipped", "reason": f"{max(budget_left, 0):.0f} s of the budget left"}
    timeout = min(stage.box_s, budget_left)
    work = os.path.join(work_root, stage.name)
    os.makedirs(work, exist_ok=True)
    commands = stage_commands(stage.name, args, work, timeout, comm_ok)
    if isinstance(commands, str):
        return record | {"status": "skipped", "reason": commands}
    stage_end = time.monotonic() + timeout
    record |= {"timeout_s": round(timeout, 1), "commands": []}
    for label, argv, env in commands:
        left = stage_end - time.monotonic()
        if left < 1:
            record["commands"].append({"label": label, "exit": "no time left"})
            continue
        log(f"[{stage.name}] {' '.join(argv)}  (at most {left:.0f} s)")
        exit_code, seconds = run_command(argv, env, left, os.path.join(work, f"{label}.log"))
        log(f"[{stage.name}] {label}: exit {exit_code} after {seconds} s")
        record["commands"].append({"label": label, "exit": exit_code, "seconds": seconds})
    exits = [c["exit"] for c in record["commands"]]
    record["status"] = ("ok" if all(e == 0 for e in exits) else
                        "timeout" if any(e in ("timeout", "no time left") for e in exits) else "failed")
    return record


# ----------------------------------------------------------------------------- headline numbers

def headline(stage, work):
    """The numbers of a stage worth reading first, from the files it wrote."""
    out = {}
    if not os.path.isdir(work):
        return out
    for name in sorted(os.listdir(work)):
        path = os.path.join(work, name)
        if name == "probe.json":
            out["probe"] = read_json(path)
        elif name == "throughput.json":
            out["throughput"] = throughput_headline(read_json(path))
        elif name == "junit.xml":
            out["tests"] = junit_counts(path)
        elif name.endswith(".json") and not name.startswith(("cpu-", "cuda-")):  # tests/test_gpu.py's records
            out.setdefault("records", {})[name.removesuffix(".json")] = read_json(path)
        elif os.path.isdir(path) and name != "demo":
            out[name] = headline(stage, path)
        elif name.endswith(".log") and stage == "compile":
            with open(path, errors="replace") as f:
                out.setdefault("recompiles_logged", 0)
                out["recompiles_logged"] += sum("Recompiling" in line for line in f)
    return out


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:  # a stage killed mid-write: say so in the summary
        return {"unreadable": f"{type(err).__name__}: {err}"}


def throughput_headline(results):
    if "rows" not in results:
        return results
    keys = ("size", "impl", "tokens_per_s", "step_ms_median", "peak_mem_bytes", "mfu_vs_measured_matmul_peak",
            "mfu_vs_datasheet_peak", "error")
    return {"complete": results.get("complete"), "device_name": results.get("device_name"),
            "peak_bf16_matmul_flops_per_s": results.get("peak_bf16_matmul_flops_per_s"),
            "rows": [{k: r.get(k) for k in keys if r.get(k) is not None} for r in results["rows"]],
            "ratios": results.get("ratios")}


def junit_counts(path):
    try:
        suite = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as err:
        return {"unreadable": str(err)}
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [case.get("name") for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


# ----------------------------------------------------------------------------- the output folder

def pack(work_root, out_dir):
    """Every stage's files as one archive in out_dir, replaced whole."""
    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(work_root, arcname="stages")
    write_atomic(os.path.join(out_dir, "stages.tar.gz"), write)


def commit_of(args):
    if args.commit:
        return args.commit
    if os.path.isdir(os.path.join(ROOT, ".git")) and shutil.which("git"):
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() or None
    return None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget <= args.min_start:
        parser.error(f"--budget {args.budget:g} must be more than --min_start {args.min_start:g}: no stage could start")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: needs CUDA (torch.cuda.is_available() is False here); nothing was run "
                  "(--device cpu is the dry run)", file=sys.stderr)
            return 2
    args.commit = commit_of(args)
    os.makedirs(args.out_dir, exist_ok=True)
    out_dir = os.path.abspath(args.out_dir)
    work_root = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(work_root, exist_ok=True)  # packed after every stage, even when none has run yet
    deadline = time.monotonic() + args.budget
    log_file = open(os.path.join(out_dir, "log.txt"), "a")

    def log(line):
        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"gpu_check: device {args.device}, budget {args.budget:g} s, commit {args.commit}, "
        f"stages {args.only or ' '.join(s.name for s in STAGES)}")
    summary = {"device": args.device, "commit": args.commit, "budget_s": args.budget, "stages": {}}
    comm_ok = True
    for stage in STAGES:
        if args.only and stage.name != args.only:
            continue
        record = run_stage(stage, args, work_root, deadline, comm_ok, log)
        if stage.name == "probe":
            probe = read_json(os.path.join(work_root, "probe", "probe.json"))
            comm_ok = bool(probe.get("communication", {}).get("ok"))
            record["communication_ok"] = comm_ok
            summary["versions"] = probe.get("versions")
        log(f"[{stage.name}] {record['status']}" + (f": {record['reason']}" if "reason" in record else ""))
        with open(os.path.join(out_dir, "stages.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        summary["stages"][stage.name] = {"status": record["status"],
                                         **headline(stage.name, os.path.join(work_root, stage.name))}
        write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
        pack(work_root, out_dir)
    statuses = [s["status"] for s in summary["stages"].values()]
    log("gpu_check: done; " + ", ".join(f"{name} {s['status']}" for name, s in summary["stages"].items()))
    log_file.close()
    return 0 if all(s in ("ok", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
