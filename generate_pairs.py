"""The DPO paper's pair-generation step (Sec. 6.1, App. C.1): sample k completions per prompt from a
policy, score them with a ground-truth reward, and write every ranked pair as JSONL the trainer reads.

    python generate_pairs.py --model out/frontier/sft/final --prompts prompts.jsonl --out pairs.jsonl \\
        --k 4 --reward vader

Of each prompt's k samples, all k(k-1)/2 pairs whose scores differ are written, the higher-scored
one as "chosen" (6 pairs per prompt for the paper's k = 4). A sample identical to an earlier one of
its prompt is dropped first (so no pair is written twice), and so is an empty one (an immediate
end-of-text); pairs of distinct samples with equal scores are dropped. All three are counted. This
is also how to make on-policy preference data from your own SFT model and reward model: `--model` takes a hub id or a local directory, `--reward` any
reward.py spec.

--prompts is a JSONL file with a "prompt" string per line (a preference file's prompts are used
once each, so a trainer's JSONL works too) or a .txt file with one prompt per line. Sampling is
batched with the KV cache and seeded (the same command writes the same file). Each output line also
carries the two scores (chosen_reward, rejected_reward), which the trainer ignores.
"""
import argparse
import itertools
import json
import os
import sys

import torch

from data.records import read_prompts
from data.tokenizer import decode, encode
from errors import DataError, InputError, exit_code_of
from gpt2 import GPT
from sample import continuations
from train.distributed import resolve_device
from train.reward import SPEC_HELP, load_reward
from train.run_dir import write_atomic


@torch.no_grad()
def sample_completions(model, prompts, k, max_new_tokens, temperature, seed, batch_size, device) -> list[list[str]]:
    """k continuations of each prompt (text, cut at the first <|endoftext|>), sampled in batches of
    batch_size rows with the KV cache; rows are the prompts repeated k times, and one generator
    runs through all batches, so one seed fixes all."""
    check_prompt_lengths(model, prompts, max_new_tokens)  # before any batch is sampled
    rows = [prompt for prompt in prompts for _ in range(k)]
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = [decode(ids) for start in range(0, len(rows), batch_size)
             for ids in continuations(model, rows[start:start + batch_size], max_new_tokens, temperature,
                                      device=device, generator=generator)]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def ranked_pairs(prompt, completions, scores):
    """Every pair of completions with different scores, higher first; returns (records, ties)."""
    records, ties = [], 0
    for i, j in itertools.combinations(range(len(completions)), 2):
        if scores[i] == scores[j]:
            ties += 1
            continue
        hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
        records.append({"prompt": prompt, "chosen": completions[hi], "rejected": completions[lo],
                        "chosen_reward": scores[hi], "rejected_reward": scores[lo]})
    return records, ties


def generate_pairs(model, prompts, reward, k=4, max_new_tokens=24, temperature=1.0, seed=0, batch_size=64,
                   device="cpu"):
    """(pair records, counts, best records): the paper's pipeline on a loaded model and reward. The
    best records hold each prompt's highest-scored completion as "chosen" (the preferred-FT
    baseline's data) and its lowest as "rejected"."""
    check_generation_options(k, max_new_tokens, temperature, batch_size, seed)
    completions = sample_completions(model, prompts, k, max_new_tokens, temperature, seed, batch_size, device)
    records, ties, best, without_pairs, empty, repeated = [], 0, [], 0, 0, 0
    for prompt, texts in zip(prompts, completions):
        empty += sum(1 for text in texts if not text)
        distinct = list(dict.fromkeys(text for text in texts if text))  # an empty one has nothing to score
        repeated += len(texts) - len(distinct) - sum(1 for text in texts if not text)
        texts = distinct  # a repeated sample would repeat its pairs
        scores = reward.score([prompt] * len(texts), texts)
        pairs, prompt_ties = ranked_pairs(prompt, texts, scores)
        records += pairs
        ties += prompt_ties
        without_pairs += not pairs
        if pairs:  # the best completion (and the worst, which SFT does not read) of each prompt
            order = sorted(range(len(texts)), key=scores.__getitem__)
            best.append({"prompt": prompt, "chosen": texts[order[-1]], "rejected": texts[order[0]]})
    counts = {"prompts": len(prompts), "samples": len(prompts) * k, "empty_samples_dropped": empty,
              "repeated_samples_dropped": repeated,
              "pairs": len(records), "ties_dropped": ties, "prompts_without_pairs": without_pairs}
    if not records:
        raise DataError(f"no pairs: every prompt's samples were empty, repeated or tied ({json.dumps(counts)}); "
                        "sample more per prompt (k), longer (max_new_tokens) or at a higher temperature")
    return records, counts, best


def check_generation(model, prompts, k, max_new_tokens, temperature, batch_size):
    """Options that cannot work, refused before any sampling."""
    check_generation_options(k, max_new_tokens, temperature, batch_size)
    check_prompt_lengths(model, prompts, max_new_tokens)


def check_prompt_lengths(model, prompts, max_new_tokens):
    longest = max(range(len(prompts)), key=lambda i: len(encode(prompts[i])))
    length = len(encode(prompts[longest]))
    if length + max_new_tokens > model.config.n_positions:
        raise InputError(f"prompt {longest + 1} ({length} tokens) + max_new_tokens {max_new_tokens} is longer than "
                         f"the model's {model.config.n_positions} positions")


def check_generation_options(k=4, max_new_tokens=24, temperature=1.0, batch_size=64, seed=0):
    if not (type(k) is int and k >= 2):
        raise InputError(f"k must be an integer >= 2 (pairs need two samples of a prompt), got {k!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not (type(value) is int and value >= 1):
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if not (type(temperature) in (int, float) and 0 < temperature < float("inf")):
        raise InputError(f"temperature must be a number > 0, got {temperature!r}")
    if type(seed) is not int:
        raise InputError(f"seed must be an integer, got {seed!r}")


def check_output_path(path, flag):
    """A file that can be written: its folder exists, and it is not a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a directory; name a file")
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path!r}: its folder {folder} does not exist")


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the policy to sample: a hub id (gpt2, org/name) or a directory "
                   "with config.json + model.safetensors (e.g. a run's out_dir/final)")
    p.add_argument("--prompts", required=True, help="JSONL with a \"prompt\" per line, or .txt with one prompt per line")
    p.add_argument("--out", required=True, help="where to write the ranked pairs (JSONL, prompt/chosen/rejected)")
    p.add_argument("--reward", default="vader", help=f"the ground-truth reward: {SPEC_HELP}")
    p.add_argument("--k", type=int, default=4, help="completions per prompt (the paper: 4, giving 6 pairs)")
    p.add_argument("--max_new_tokens", type=int, default=24, help="tokens sampled per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--batch_size", type=int, default=64, help="rows sampled together")
    p.add_argument("--best_out", default="", help="also write each prompt's best completion as JSONL "
                   "(the preferred-FT baseline's data), if given")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = p.parse_args(argv)
    check_output_path(args.out, "--out")
    if args.best_out:
        check_output_path(args.best_out, "--best_out")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    prompts = read_prompts(args.prompts)
    model = GPT.from_pretrained(args.model, device=device).eval()
    check_generation(model, prompts, args.k, args.max_new_tokens, args.temperature, args.batch_size)
    reward = load_reward(args.reward, device=str(device))
    print(f"sampling {args.k} completions for each of {len(prompts)} prompts from {args.model}", flush=True)
    records, counts, best = generate_pairs(model, prompts, reward, args.k, args.max_new_tokens, args.temperature,
                                           args.seed, args.batch_size, device)
    write_jsonl(args.out, records)
    if args.best_out:
        write_jsonl(args.best_out, best)
    print(f"wrote {args.out}: {json.dumps(counts)}")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
