"""Sample continuations from a GPT-2 checkpoint (hub id or local directory).

    python sample.py --model gpt2 --prompt "The movie was" --num_samples 3
"""
import argparse
import math
import sys

import torch

from data.batches import left_pad
from data.tokenizer import EOT_ID, decode, encode
from errors import InputError, exit_code_of
from gpt2 import GPT
from train.distributed import resolve_device


def continuations(model, prompts, max_new_tokens, temperature, top_k=None, top_p=None, seed=0, device="cpu",
                  generator=None):
    """The new token ids of each prompt's continuation, up to (not including) <|endoftext|>. The
    draws come from `generator` when given (one stream over several batches), else from `seed`."""
    input_ids, mask = (t.to(device) for t in left_pad([encode(p) for p in prompts]))
    T = input_ids.size(1)
    if T + max_new_tokens > model.config.n_positions:
        raise InputError(f"a prompt of {T} tokens + max_new_tokens {max_new_tokens} is longer than the model's "
                         f"{model.config.n_positions} positions; shorten the prompt or max_new_tokens")
    generator = generator or torch.Generator(device=device).manual_seed(seed)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=generator)
    rows = out[:, T:].tolist()
    return [row[:row.index(EOT_ID)] if EOT_ID in row else row for row in rows]


def check_sampling_options(args):
    """Values sampling cannot use, refused in one line before the model is loaded."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top_k must be >= 1, got {args.top_k}")
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.prompt is not None and not all(args.prompt):
        raise InputError("--prompt is empty: a continuation needs at least one token to follow")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2",
                        help="hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, org/name) or a local directory "
                             "holding config.json + model.safetensors, such as a run's out_dir/final (default: gpt2)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit); default main")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for a batch (default: three fixed prompts)")
    parser.add_argument("--num_samples", type=int, default=1, help="continuations per prompt (default 1)")
    parser.add_argument("--max_new_tokens", type=int, default=40, help="tokens to generate (default 40)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default 0.7)")
    parser.add_argument("--top_k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    args = parser.parse_args(argv)
    check_sampling_options(args)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = args.prompt or ["The movie was", "My favourite thing about the city is", "Once upon a time"]
    prompts = [p for p in prompts for _ in range(args.num_samples)]
    model = GPT.from_pretrained(args.model, dtype=dtype, device=device, revision=args.revision)
    rows = continuations(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                         device)
    for prompt, row in zip(prompts, rows):
        print(f"--- {prompt!r}\n{prompt}{decode(row)}\n")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
