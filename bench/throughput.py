"""Time one full DPO training step: ours (train.step.train_step) against the same step in transformers.

    python bench/throughput.py --device cpu --sizes gpt2,gpt2-medium --pairs 8 --dtype fp32
    python bench/throughput.py --device cuda --dtype bf16                       # all four sizes
    torchrun --nproc_per_node 8 bench/throughput.py --sizes gpt2-xl             # FSDP, ours only
    python bench/throughput.py --fsdp_memory --sizes gpt2                       # world sizes 1 and 2 (GPUs allowing)
    torchrun --nproc_per_node 2 bench/throughput.py --fsdp_memory --sizes gpt2  # one world size

One step = policy forward + backward on chosen and rejected, reference forward, gradient clipping,
AdamW step. "ours" calls the trainer's own functions (distributed.build_training_state,
train.step.train_step); "transformers" is the same DPO step written the straightforward way with
GPT2LMHeadModel. Both get the same pairs (ours in the layout its trainer uses), random init at the
real shapes, no download.
As a plain `python`, each (size, impl) runs in a fresh subprocess, so each gets its own peak memory,
under --worker_timeout; each row is printed and the JSON files rewritten (whole, by rename) as soon
as it is measured, so a run that is killed leaves every finished row behind ("complete": false).
Both workers switch cuDNN attention off before building anything (gpt2.avoid_cudnn_attention), so
the two steps run with the same attention kernels.

FLOPs per step (model FLOPs: recomputation from activation checkpointing is not counted), for
S rows of T positions as the model runs them, L layers, width d, vocab V, H = LM-head rows,
M = parameters of the last block's ln_2 and MLP and of ln_f (they run only at the H rows whose
logits are used), N = the other parameters of the blocks (they multiply every position;
embeddings are lookups):
    policy    = S*T * (6*N + 12*L*T*d) + 6*(M + d*V)*H     forward + backward
    reference = S*T * (2*N +  4*L*T*d) + 2*(M + d*V)*H     forward only
    step      = policy + reference
4*L*T*d per position is attention's QK^T and AV over all T keys of its row (the PaLM convention:
no discount for the causal mask). With P = prompt_len, R = response_len, B = pairs:
    transformers                 S = 2B, T = P + R,  H = 2B * (P + R)   (logits at every position)
    ours, separate rows          S = 2B, T = P + R,  H = 2B * R         (logits only where used)
    ours, prefix sharing         S = B,  T = P + 2R, H = 2B * R         (the prompt runs once)
MFU per GPU = step FLOPs / step time / world size / a peak, CUDA only (null on CPU), against two peaks:
    mfu_vs_measured_matmul_peak   the best bf16 rate of 8192^2 matmuls measured in the same run
    mfu_vs_datasheet_peak         NVIDIA's datasheet dense bf16 peak for the GPU's name (null: unknown)
tokens/s always counts 2B * (P + R) tokens per step, however they are laid out. See bench/NOTES.md.
"""
import argparse
import contextlib
import copy
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.report import write_results  # noqa: E402
from data.batches import Pair, collate, collate_pairs  # noqa: E402
from gpt2 import EOT_ID, GPT, GPTConfig, PRESETS, avoid_cudnn_attention  # noqa: E402
from train import distributed  # noqa: E402
from train.config import TrainConfig, reference_precision_name  # noqa: E402
from train.optim import lr_at  # noqa: E402
from train.step import train_step  # noqa: E402


def sources_sha1():
    """A fingerprint of the project's code (*.py at the top, in data/ and in train/), read right after importing
    it. It may be edited while a long benchmark runs; rows measured on different code must not be
    compared, and a results file says which code it measured."""
    digest = hashlib.sha1()
    for folder in (ROOT, os.path.join(ROOT, "data"), os.path.join(ROOT, "train")):
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


SOURCES_SHA1 = sources_sha1()
# The four GPT-2 shapes, plus a tiny one for smoke tests (full vocab, so the LM head is still real).
SIZES = {name: GPTConfig.from_name(name) for name in PRESETS} | {"tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64)}
IMPLS = ("ours", "transformers")


# ----------------------------------------------------------------------------- options

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the steps run; auto = cuda when torch.cuda.is_available(), else cpu")
    p.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl", help=f"comma list of {list(SIZES)}")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (per rank under torchrun)")
    p.add_argument("--prompt_len", type=int, default=64, help="prompt tokens of every pair")
    p.add_argument("--response_len", type=int, default=24, help="tokens of every chosen and every rejected response")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (at least 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, kernels, compile)")
    p.add_argument("--reference_dtype", default="same", choices=("same", "fp32", "bf16"),
                   help="ours: the trainer's reference_precision (the frozen reference's dtype); "
                        "transformers keeps its reference in --dtype")
    p.add_argument("--prefix_sharing", choices=("on", "off"), default="on" if TrainConfig().prefix_sharing else "off",
                   help="ours: the trainer's prefix_sharing (one packed row per pair); default: the trainer's")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block in backward: ours through the trainer's parallelize(), "
                        "transformers through gradient_checkpointing_enable()")
    p.add_argument("--compile", action="store_true", help="ours: per block, as the trainer; transformers: whole model")
    p.add_argument("--impls", default="ours,transformers", help=f"comma list of {list(IMPLS)}; under torchrun ours only")
    p.add_argument("--sharding", default="auto", choices=("auto", "none", "full"),
                   help="ours: auto = none (plain module) for a single fp32 process without activation "
                        "checkpointing or compile, else full (FSDP, also over one rank): the trainer applies "
                        "bf16, checkpointing and compile only through parallelize()")
    p.add_argument("--fsdp_memory", action="store_true",
                   help="per-rank bytes of params, grads and optimizer state under FSDP, and step time")
    p.add_argument("--world_sizes", default="1,2",
                   help="--fsdp_memory as a plain python: torchrun each of these; on cuda, world sizes above "
                        "torch.cuda.device_count() are skipped (with a note)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process; 0 = cores / local ranks")
    p.add_argument("--worker_timeout", type=float, default=900,
                   help="seconds one (size, impl) subprocess may take, set-up included; past it, it is killed "
                        "and its row records the timeout")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairs and of the models' initialisation")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"),
                   help="where <device>-<dtype>-<yyyymmdd>.json goes")
    # internal: how run_in_subprocesses and run_fsdp_worlds talk to the processes they launch
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)      # "size:impl", run in a subprocess
    p.add_argument("--_worker_out", default=None, help=argparse.SUPPRESS)  # where that subprocess writes its JSON
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sizes = args.sizes.split(",")
    args.impls = args.impls.split(",")
    args.prefix_sharing = args.prefix_sharing == "on"
    if unknown := [s for s in args.sizes if s not in SIZES]:
        p.error(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
    if unknown := [i for i in args.impls if i not in IMPLS]:
        p.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    if args.steps < 10:
        p.error(f"--steps must be >= 10 so that the median and spread mean something, got {args.steps}")
    if min(args.pairs, args.prompt_len, args.response_len) < 1 or args.warmup < 0:
        p.error("--pairs, --prompt_len and --response_len must be >= 1, --warmup >= 0")
    if args.prompt_len + args.response_len > 1024:
        p.error("--prompt_len + --response_len must fit GPT-2's 1024 positions")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.world = int(os.environ.get("WORLD_SIZE", 1))
    if args.world > 1:  # transformers has no sharded variant here
        args.impls = [i for i in args.impls if i != "transformers"]
    if args.world > 1 and args.sharding == "none":
        p.error("--sharding none is one process only; under torchrun ours runs with FSDP (full)")
    if args.sharding == "auto":
        plain = args.world == 1 and args.dtype == "fp32" and not (args.activation_checkpointing or args.compile)
        args.sharding = "none" if plain and not args.fsdp_memory else "full"
    if args.fsdp_memory:
        args.sharding = "full"
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        p.error(f"--world_sizes: expected a comma list of integers, got {args.world_sizes!r}")
    if min(args.world_sizes) < 1:
        p.error(f"--world_sizes must be >= 1, got {args.world_sizes}")
    return args


def set_threads(args):
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))


# ----------------------------------------------------------------------------- the batch

def make_batch(args, impl, seed):
    """`pairs` random preference pairs of fixed lengths (the same pairs for both impls), collated.

    transformers: collate_pairs, rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected.
    ours: the trainer's own collate(), whose layout follows its config: those same rows, or with
    prefix_sharing one packed row [prompt | chosen | rejected] per pair.
    """
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):  # ids below EOT_ID (50256, the last id and the pad): any ordinary GPT-2 token
        return torch.randint(0, EOT_ID, (n,), generator=generator).tolist()

    pairs = [Pair(tokens(args.prompt_len), tokens(args.response_len), tokens(args.response_len), group_index=i,
                  chosen_index=0, rejected_index=1) for i in range(args.pairs)]
    if impl == "ours":
        return collate(pairs, share_prompt=args.prefix_sharing)
    return collate_pairs(pairs)  # input_ids, attention_mask, response_mask: (2B, T)


def model_shape(args, impl):
    """(rows, positions per row, LM-head rows) of one forward, as the docstring's table says."""
    B, P, R = args.pairs, args.prompt_len, args.response_len
    if impl == "transformers":
        return 2 * B, P + R, 2 * B * (P + R)
    if args.prefix_sharing:
        return B, P + 2 * R, 2 * B * R
    return 2 * B, P + R, 2 * B * R


# ----------------------------------------------------------------------------- FLOPs and memory

def step_flops(config: GPTConfig, n_rows, row_len, head_rows):
    """Model FLOPs of one DPO step (formula in the module docstring and bench/NOTES.md)."""
    with torch.device("meta"):
        model = GPT(config)
    last = model.transformer.h[-1]
    n_last_mlp = sum(p.numel() for m in (last.ln_2, last.mlp) for p in m.parameters())
    n_tail = n_last_mlp + sum(p.numel() for p in model.transformer.ln_f.parameters())  # M: only at the H rows
    n_body = sum(p.numel() for p in model.transformer.h.parameters()) - n_last_mlp  # N: at every position
    L, d, V = config.n_layer, config.n_embd, config.vocab_size
    tokens = n_rows * row_len
    attention = 4 * L * row_len * d  # per position, forward
    policy = tokens * (6 * n_body + 3 * attention) + 6 * (n_tail + d * V) * head_rows
    reference = tokens * (2 * n_body + attention) + 2 * (n_tail + d * V) * head_rows
    return policy + reference


def proc_status_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process from /proc; getrusage's peak elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def matmul_peak_flops_per_s(device, dtype):
    """The best rate of a large square matmul: the denominator of MFU."""
    n, iters = 8192, 20
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return 2 * n ** 3 / best


# NVIDIA's datasheet peak of dense bf16 Tensor Core math, per GPU. The datasheets print the figure with
# 2:4 structured sparsity, twice these: A100 312 TFLOPS dense (https://www.nvidia.com/en-us/data-center/a100/);
# H100 SXM 1,979 / PCIe 1,513 / NVL 1,671 with sparsity (https://www.nvidia.com/en-us/data-center/h100/);
# H200 SXM 1,979 / NVL 1,671 with sparsity (https://www.nvidia.com/en-us/data-center/h200/); GH200's GPU is
# the H100 SXM's Hopper (https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/). Matched against
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part), most specific first.
DATASHEET_BF16_DENSE_FLOPS_PER_S = (
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835.5e12),
    (("h100",), 989.4e12),
    (("gh200",), 989.4e12),
    (("h200", "nvl"), 835.5e12),
    (("h200",), 989.4e12),
    (("a100",), 312e12),
)


def datasheet_peak_flops_per_s(device_name):
    """The datasheet's dense bf16 peak of one GPU of this name, or None (unknown: no MFU against it)."""
    name = device_name.lower()
    for words, flops_per_s in DATASHEET_BF16_DENSE_FLOPS_PER_S:
        if all(w in name for w in words):
            return flops_per_s
    return None


def usable_world_sizes(requested, device_type, device_count):
    """(the world sizes --fsdp_memory can run here, a note for each one skipped). On CUDA rank r takes
    cuda:r, so a world size needs that many GPUs; gloo on CPU runs any number of processes."""
    if device_type != "cuda":
        return list(requested), []
    kept = [w for w in requested if w <= device_count]
    notes = [f"note: --world_sizes {w} skipped: this machine has {device_count} CUDA device(s) "
             f"(torch.cuda.device_count()) and world size {w} needs {w}" for w in requested if w > device_count]
    return kept, notes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_bytes(tensors):
    """Bytes this rank holds: the local shard of a DTensor, the whole of a plain tensor."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- the two steps

def train_config(args, size):
    shape = SIZES[size]
    return TrainConfig(init_from="scratch", n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                       n_positions=shape.n_positions, device=args.device, seed=args.seed, precision=args.dtype,
                       sharding=args.sharding, activation_checkpointing=args.activation_checkpointing,
                       compile=args.compile, prefix_sharing=args.prefix_sharing, batch_size=args.pairs,
                       reference_precision=args.reference_dtype,
                       micro_batch_size=args.pairs, max_prompt_len=args.prompt_len,
                       max_len=args.prompt_len + args.response_len)


def build_ours(args, size, rank, device, mesh):
    """The trainer's own models, optimizer and step; nothing of it is re-implemented here."""
    cfg = train_config(args, size)
    state = distributed.build_training_state(cfg, rank, device, mesh)
    lr = lr_at(0, 1, cfg)

    def step(batch):
        metrics, _, _, _ = train_step(state.policy, state.reference, state.optimizer, [batch], cfg, lr,
                                              state.scaler)
        return metrics["loss"]
    return step, state.policy, state.reference, state.optimizer


def build_transformers(args, size, device):
    """What a user would otherwise write: GPT2LMHeadModel, full logits, log_softmax in fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel
    shape, cfg = SIZES[size], train_config(args, size)
    hf_config = GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                           vocab_size=shape.vocab_size, n_positions=shape.n_positions, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs, once
        policy = GPT2LMHeadModel(hf_config).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the reference starts equal to the policy
    if args.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    policy_fn, reference_fn = (torch.compile(policy), torch.compile(reference)) if args.compile else (policy, reference)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def sequence_logps(model, batch):
        with autocast:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
        logps = logits[:, :-1].float().log_softmax(-1)  # (2B, T-1, V) fp32
        token_logps = logps.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
        return (token_logps * batch.response_mask[:, 1:]).sum(-1)  # (2B,)

    def step(batch):
        n_pairs = batch.input_ids.size(0) // 2
        policy_logps = sequence_logps(policy_fn, batch)
        with torch.no_grad():
            reference_logps = sequence_logps(reference_fn, batch)
        logratios = policy_logps - reference_logps  # (2B,)
        loss = -F.logsigmoid(cfg.beta * (logratios[:n_pairs] - logratios[n_pairs:])).mean()  # DPO Eq. 7
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)  # the trainer clips too: same work
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step, policy, reference, optimizer


def time_steps(step, batch, args, device):
    """(step times in s, losses) of the timed steps, after args.warmup untimed ones."""
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step(batch)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def timing_fields(times, tokens_per_step, flops_per_step):
    ms = sorted(t * 1e3 for t in times)
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    median_s = statistics.median(times)
    return {"tokens_per_s": tokens_per_step / median_s, "step_ms_median": statistics.median(ms),
            "step_ms_min": ms[0], "step_ms_max": ms[-1], "step_ms_p10": deciles[0], "step_ms_p90": deciles[-1],
            "step_ms_all": [round(t * 1e3, 2) for t in times],  # in the order they ran
            "model_flops_per_step": flops_per_step, "model_flops_per_s": flops_per_step / median_s}


# ----------------------------------------------------------------------------- one measurement

def measure(args, size, impl, rank=0, world=1, device=None, mesh=None):
    """One (size, impl): build, warm up, time; a row of the results. Memory is this process's peak."""
    device = device or torch.device(args.device)
    rss_before_model = proc_status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if impl == "ours":
        step, policy, reference, optimizer = build_ours(args, size, rank, device, mesh)
    else:
        step, policy, reference, optimizer = build_transformers(args, size, device)
    batch = make_batch(args, impl, seed=args.seed + rank).to(device)
    grad_bytes = []  # read just before AdamW runs: train_step frees the gradients after it
    hook = optimizer.register_step_pre_hook(lambda *_: grad_bytes.append(
        local_bytes(p.grad for p in policy.parameters() if p.grad is not None)))
    times, losses = time_steps(step, batch, args, device)
    hook.remove()
    config = SIZES[size]
    tokens_per_step = world * 2 * args.pairs * (args.prompt_len + args.response_len)  # as if run separately
    row = {"size": size, "impl": impl, "device": device.type, "n_layer": config.n_layer, "n_head": config.n_head,
           "n_embd": config.n_embd, "n_params": sum(p.numel() for p in policy.parameters()), "world_size": world,
           "sharding": args.sharding if impl == "ours" else "none", "precision": args.dtype,
           "reference_precision": (reference_precision_name(train_config(args, size)) if impl == "ours"
                                   else args.dtype),
           "prefix_sharing": args.prefix_sharing and impl == "ours", "tokens_per_step": tokens_per_step,
           **timing_fields(times, tokens_per_step, world * step_flops(config, *model_shape(args, impl))),
           "loss_first": losses[0], "loss_last": losses[-1], "rss_before_model_bytes": rss_before_model}
    if device.type == "cuda":
        row |= {"peak_mem_bytes": torch.cuda.max_memory_allocated(device),
                "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    else:
        row |= {"peak_mem_bytes": proc_status_bytes("VmHWM")}
    row |= {"param_bytes": local_bytes(policy.parameters()), "grad_bytes": grad_bytes[-1] if grad_bytes else 0,
            "optimizer_bytes": local_bytes(v for s in optimizer.state.values() for v in s.values()
                                           if torch.is_tensor(v)),
            "reference_param_bytes": local_bytes(reference.parameters()),
            "unsharded_param_bytes": sum(p.numel() * p.element_size() for p in policy.parameters())}
    row["train_state_bytes"] = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    del step, policy, reference, optimizer, batch
    gc.collect()
    # MFU's denominator, on CUDA only: on CPU no MFU is reported, and the measurement cost 3 s a row
    measure_peak = device.type == "cuda" and rank == 0
    row["matmul_peak_flops_per_s"] = matmul_peak_flops_per_s(device, torch.bfloat16) if measure_peak else None
    row["matmul_peak_dtype"] = "bfloat16" if measure_peak else None
    # per GPU; MFU against it and against the best measured bf16 matmul rate is set by bench/report.py
    row["datasheet_peak_flops_per_s"] = datasheet_peak_flops_per_s(device_name(device)) if device.type == "cuda" else None
    return row


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- drivers

def run_worker(args):
    """Subprocess: one (size, impl) in a fresh process; writes its row as JSON."""
    set_threads(args)
    avoid_cudnn_attention()  # process-wide, before either impl builds or times anything
    size, impl = args._worker.split(":")
    device, mesh, rank = torch.device(args.device), None, 0
    if impl == "transformers":  # imported before the baseline RSS is read, as fsdp_train is for ours
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    if impl == "ours":  # the trainer's own set-up: a one-process group (gloo / nccl), a mesh when sharded
        cfg = train_config(args, size)
        rank, _, device, mesh = distributed.setup_distributed(cfg)
    row = measure(args, size, impl, rank, 1, device, mesh)
    row["device_name"], row["sources_sha1"] = device_name(device), SOURCES_SHA1
    distributed.end_process_group()
    with open(args._worker_out, "w") as f:
        json.dump(row, f)


def run_in_subprocesses(args, defaults):
    """Plain python: every (size, impl) in its own process, so each gets its own peak memory. After
    each, its row is printed and the results so far written."""
    rows = []
    for size in args.sizes:
        for impl in args.impls:
            print(f"running {size} {impl} ...", flush=True)
            rows.append(run_one_worker(args, size, impl))
            print(row_line(rows[-1]), flush=True)
            write_results(args, rows, defaults, complete=False)
    return rows


def run_one_worker(args, size, impl):
    """One (size, impl) in a fresh process under --worker_timeout: its row, or a row naming the failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        command = [sys.executable, os.path.abspath(__file__), *args.argv, f"--_worker={size}:{impl}",
                   f"--_worker_out={out}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired as err:  # run() has killed it
            output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
            error = f"timed out after {args.worker_timeout:g} s (--worker_timeout)\n{output[-2000:]}"
        else:
            if result.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    return json.load(f)
            error = f"exit {result.returncode}\n{(result.stdout + result.stderr)[-2000:]}"
    print(f"{size} {impl} failed: {error}", file=sys.stderr)
    return {"size": size, "impl": impl, "error": error, "tokens_per_s": None, "step_ms_median": None,
            "peak_mem_bytes": None, "mfu_vs_measured_matmul_peak": None, "mfu_vs_datasheet_peak": None}


def row_line(row):
    """One printed line per measured row, as it arrives."""
    if row.get("error"):
        return f"{row['size']} {row['impl']}: failed ({row['error'].splitlines()[0]})"
    return (f"{row['size']} {row['impl']}: {row['tokens_per_s']:,.1f} tokens/s, step {row['step_ms_median']:.1f} ms "
            f"(median), peak memory {row['peak_mem_bytes'] / 2**30:.2f} GiB")


def run_distributed(args):
    """Under torchrun: ours with FSDP over all ranks, every size in this process (rank 0 reports).
    With --fsdp_memory the rows also carry each rank's bytes (gathered to rank 0)."""
    set_threads(args)
    rank, world, device, mesh = distributed.setup_distributed(train_config(args, args.sizes[0]))
    rows = []
    for size in args.sizes:
        row = measure(args, size, "ours", rank, world, device, mesh)
        keys = ["param_bytes", "grad_bytes", "optimizer_bytes", "reference_param_bytes", "train_state_bytes",
                "peak_mem_bytes", "step_ms_median"]
        local = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        row["per_rank"] = [dict(zip(keys, t.tolist())) for t in gathered]
        for k in ("train_state_bytes", "peak_mem_bytes"):
            row[k] = max(r[k] for r in row["per_rank"])  # the rank that runs out first
        row["device_name"], row["sources_sha1"] = device_name(device), SOURCES_SHA1
        rows.append(row)
    distributed.end_process_group()
    return rows if rank == 0 else None


def run_fsdp_worlds(args):
    """--fsdp_memory as a plain python: torchrun each world size, then the ratios to world size 1."""
    worlds, notes = usable_world_sizes(args.world_sizes, args.device,
                                       torch.cuda.device_count() if args.device == "cuda" else 0)
    for note in notes:
        print(note, flush=True)
    if not worlds:
        sys.exit(f"--fsdp_memory: none of --world_sizes {args.world_sizes} fits this machine's "
                 f"{torch.cuda.device_count()} CUDA device(s)")
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       os.path.abspath(__file__), *args.argv, f"--_worker_out={out}"]
            print(f"running --fsdp_memory at world size {world} ...", flush=True)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"torchrun at world size {world} failed (exit {result.returncode}):\n"
                         + (result.stdout + result.stderr)[-3000:])
            with open(out) as f:
                rows += json.load(f)["rows"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        return run_worker(args)
    if "RANK" in os.environ:  # under torchrun
        rows = run_distributed(args)
        if rows is None:
            return 0
        if args._worker_out:  # launched by run_fsdp_worlds
            with open(args._worker_out, "w") as f:
                json.dump({"rows": rows}, f)
            return 0
        return write_results(args, rows, parse_args(["--device", args.device]))
    if args.fsdp_memory:
        return write_results(args, run_fsdp_worlds(args), parse_args(["--device", args.device]))
    defaults = parse_args(["--device", args.device])
    return write_results(args, run_in_subprocesses(args, defaults), defaults)


if __name__ == "__main__":
    sys.exit(main())
