"""PPO's speed at a real model shape: rollout tokens/s, update tokens/s and peak memory, from the
trainer's own per-step figures (ppo_train.py, random initialisation, no download).

    python bench/ppo_throughput.py --device cpu                  # gpt2, fp32, 16 rollouts of 48 tokens
    python bench/ppo_throughput.py --device cuda --batch_size 64 --mini_batch_size 16 --micro_batch_size 16

One PPO step = a rollout (batch_size prompts of the demo set, max_new_tokens sampled with the KV cache
at temperature 1, each scored by a reward model of the policy's size (a random-init score head:
rm:, the PPO-with-a-reward-model setting), the policy with its value head and the reference run over
the samples), then ppo_epochs passes of mini-batch updates (forward and backward over prompt +
response). The trainer times both parts of every step:
    rollout_tokens_per_s  sampled tokens (batch_size x max_new_tokens, all ranks) / the rollout's time
    update_tokens_per_s   prompt + response tokens run forward and backward (ppo_epochs x batch_size
                          rows) / the updates' time
Rows are the median over the timed steps, after --warmup untimed ones. Peak memory: the CUDA
allocator's peak, or the process's peak RSS on CPU. Written to bench/results/<device>-ppo-<size>-<date>.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ppo_train  # noqa: E402
from bench.report import git_state  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS  # noqa: E402
from train.distributed import resolve_device  # noqa: E402
from train.run_dir import read_metrics, write_atomic  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--size", default="gpt2", choices=list(PRESETS))
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch_size", type=int, default=16, help="rollouts per PPO step")
    p.add_argument("--mini_batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO steps first")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"))
    return p


def reward_model_of(size, directory):
    """A random-init reward model of the policy's shape, as rm: reads it."""
    model = GPT(GPTConfig.from_name(size), score_head=True).init_weights(seed=1)
    model.save_pretrained(directory)
    return f"rm:{directory}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = PRESETS[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        reward = reward_model_of(args.size, os.path.join(tmp, "rm"))
        out_dir = os.path.join(tmp, "run")
        trainer_args = [
            "--init_from=scratch", f"--n_layer={shape['n_layer']}", f"--n_head={shape['n_head']}",
            f"--n_embd={shape['n_embd']}", "--n_positions=1024", "--dataset=demo", "--max_prompt_len=16",
            f"--max_len={16 + args.max_new_tokens}", f"--precision={precision}", f"--device={device.type}",
            f"--batch_size={args.batch_size}", f"--mini_batch_size={args.mini_batch_size}",
            f"--micro_batch_size={args.micro_batch_size}", f"--ppo_epochs={args.ppo_epochs}",
            f"--max_new_tokens={args.max_new_tokens}", f"--max_steps={args.steps + args.warmup}", "--log_every=1",
            "--eval_every=0", "--eval_fraction=0", "--kl_samples=0", "--n_samples=0", f"--reward={reward}",
            f"--out_dir={out_dir}"]
        started = time.time()
        exit_code = ppo_train.run(trainer_args)
        if exit_code != 0:
            raise SystemExit(f"ppo_train.py failed (exit {exit_code})")
        steps = [r for r in read_metrics(out_dir) if "rollout_tokens_per_s" in r][args.warmup:]
    row = {"size": args.size, "precision": precision, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "ppo_epochs": args.ppo_epochs, "mini_batch_size": args.mini_batch_size,
           "micro_batch_size": args.micro_batch_size, "timed_steps": len(steps),
           "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in steps),
           "update_tokens_per_s": statistics.median(r["update_tokens_per_s"] for r in steps),
           "peak_memory_gib": max(r["peak_memory_gib"] for r in steps), "wall_s": time.time() - started}
    commit, dirty = git_state()
    result = {"benchmark": "ppo_step", "device": device.type, "device_name": device_name(device),
              "torch_version": torch.__version__, "command": " ".join(["python", "bench/ppo_throughput.py",
                                                                         *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_commit": commit, "git_uncommitted_files": dirty,
              "threads": torch.get_num_threads(), "rows": [row]}
    print(json.dumps(row))
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"{device.type}-ppo-{args.size}-{time.strftime('%Y%m%d')}.json")
    write_atomic(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from bench.throughput import device_name as cpu_name  # the CPU's model name, as the DPO bench writes it
    return cpu_name(device)


if __name__ == "__main__":
    main()
