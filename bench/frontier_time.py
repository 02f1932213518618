"""The expected time of every run of a frontier config on this machine, measured by the trainers
themselves at the config's model size and shapes.

    HF_HUB_OFFLINE=1 python bench/frontier_time.py --config_file config/frontier_gpt2_imdb.yaml \
        --device cuda --prompts 25000
    python bench/frontier_time.py --config_file config/frontier_demo.yaml --device cpu

No data and no weights are needed. Each job of the frontier (SFT, DPO, unlikelihood,
preferred-FT, the reward model, PPO on it, PPO-GT) runs its own trainer (fsdp_train.py, ppo_train.py)
with the config's options for a few steps, from random weights of the config's model shape, on
stand-in data of the real sizes and lengths:
  - SFT text: --texts texts of --text_tokens tokens (default: the SFT stage's max_len - 1, every
    review cut there: an upper bound, real reviews are shorter);
  - pairs: --prompts prompts of --prompt_tokens tokens (5: the paper's are 2-8), each with k
    responses of --response_tokens (default the generation's max_new_tokens, every sample at full
    length: an upper bound where samples end early) and all --pairs_per_prompt pairs among them
    (k(k-1)/2: no ties);
  - the ground-truth reward: the config's own where it loads here (VADER installed, a classifier in
    the hub cache, or fetched from the hub unless HF_HUB_OFFLINE=1), else a random-init reward model (rm:) of --reward_shape (gpt2-medium: 24 layers,
    1,024 wide, 355M parameters, the shape and size of siebert's roberta-large); PPO's reward model:
    one of the policy's shape, as the frontier trains it.
The trainers log seconds per step (step_s) and per evaluation (eval/seconds); the rest of a short
run's wall time (data, models, samples, the export) is its overhead. A run's expected time is
    overhead + steps x step_s + evaluations x eval_s,
its steps and evaluations counted as the trainer counts them (its loader on the stand-in data, its
plan_steps). The pairs stage is timed on one batch of prompts (sampling and scoring) and scaled to
--prompts. Printed as a table; written to bench/results/<device>-frontier_time-<config>-<date>.json.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import frontier  # noqa: E402
import fsdp_train  # noqa: E402
import ppo_train  # noqa: E402
from bench.report import git_state  # noqa: E402
from errors import ConfigError, exit_code_of  # noqa: E402
from data.records import read_prompts  # noqa: E402
from generate_pairs import generate_pairs, write_jsonl  # noqa: E402
from gpt2 import GPT, GPTConfig, PRESETS, looks_like_a_path, read_hf_config  # noqa: E402
from train.config import parse_args  # noqa: E402
from train.distributed import resolve_device  # noqa: E402
from train.reward import load_reward  # noqa: E402
from train.run_dir import read_metrics, write_atomic  # noqa: E402

JOBS = ("sft", "pairs", "dpo", "unlikelihood", "preferred_ft", "reward_model", "ppo", "ppo_gt")
DATA_KEYS = ("dataset", "data_path", "max_prompt_len", "max_len", "eval_fraction", "seed", "append_eos", "max_records",
             "eval_prompts")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config_file", required=True, help="a frontier config (frontier.py's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the jobs run")
    p.add_argument("--texts", type=int, default=25000, help="SFT texts (IMDb's train split: 25,000 reviews)")
    p.add_argument("--text_tokens", type=int, default=0, help="tokens of each SFT text (0: the SFT stage's max_len - 1)")
    p.add_argument("--prompts", type=int, default=0,
                   help="prompts of the pairs (0: the config's prompt file's count; IMDb's train reviews give about 25,000)")
    p.add_argument("--pairs_per_prompt", type=int, default=0, help="pairs per prompt (0: all k(k-1)/2, no ties)")
    p.add_argument("--prompt_tokens", type=int, default=5, help="tokens of each stand-in prompt (about)")
    p.add_argument("--response_tokens", type=int, default=0,
                   help="tokens of each stand-in response, before its <|endoftext|> (0: the generation's max_new_tokens)")
    p.add_argument("--reward_shape", default="gpt2-medium", choices=(*PRESETS, "policy"),
                   help="the ground-truth reward's stand-in where the config's cannot be loaded here: a random-init "
                        "reward model of this shape")
    p.add_argument("--stand_in_reward", action="store_true",
                   help="use the stand-in even where the config's reward loads here")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma list of {', '.join(JOBS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each job (PPO: --ppo_steps)")
    p.add_argument("--ppo_steps", type=int, default=1, help="timed PPO steps (each is a rollout and all its updates)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (not for PPO: a step is long)")
    p.add_argument("--plan_only", action="store_true",
                   help="count each run's steps and evaluations, measure nothing (no model is built or run)")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"), help="where the JSON goes")
    return p


# ----------------------------------------------------------------------------- the stand-ins

def policy_shape(init_from, trainer) -> GPTConfig:
    """The model shape the config trains: its init_from's (a preset, a local directory) or scratch's."""
    if init_from == "scratch":
        keys = ("n_layer", "n_head", "n_embd", "n_positions")
        return GPTConfig(**{key: trainer.get(key, getattr(fsdp_train.TrainConfig(), key)) for key in keys})
    if looks_like_a_path(init_from):
        return read_hf_config(init_from)
    name = init_from.removeprefix("openai-community/")
    if name not in PRESETS:
        raise ConfigError(f"init_from {init_from!r}: not a GPT-2 size this bench knows ({', '.join(PRESETS)}); "
                          "give a local directory with its config.json")
    return GPTConfig.from_name(name)


def save_model(config: GPTConfig, directory, score_head=False, seed=0) -> str:
    GPT(config, score_head=score_head).init_weights(seed=seed).save_pretrained(directory)
    return directory


def ground_truth_reward(spec, policy, args, work) -> str:
    """The config's reward where it loads here, else (or with --stand_in_reward) the stand-in's rm: spec."""
    if not args.stand_in_reward:
        try:
            load_reward(spec)
            print(f"reward: the config's own, {spec}")
            return spec
        except ConfigError as err:
            print(f"reward: {spec} cannot be loaded here ({str(err).splitlines()[0]}); a random-init reward model of "
                  f"{args.reward_shape}'s shape stands in")
    shape = policy if args.reward_shape == "policy" else GPTConfig.from_name(args.reward_shape)
    return "rm:" + save_model(shape, os.path.join(work, "reward"), score_head=True, seed=2)


def write_lines(path, records):
    write_jsonl(path, records)  # generate_pairs.py's
    return path


def stand_in_data(work, args, k, response_tokens, text_tokens, with_texts) -> dict:
    """Files of the real sizes and lengths: texts (SFT), pairs and best (the pairs stage's output),
    prompts (the pairs stage's input, eval_prompts). Word-built, so the token counts are exact (the
    prompts' give or take one: a number above 999 may be two tokens)."""
    def prompt(i):
        return f"{i}" + " film" * (args.prompt_tokens - 1)
    responses = [" good" * (response_tokens - 1) + f" {j}" for j in range(k)]  # + <|endoftext|>, as sampled
    chosen_rejected = [(a, b) for a in range(k) for b in range(a + 1, k)][:args.pairs_per_prompt]
    pairs = ({"prompt": prompt(i), "chosen": responses[a], "rejected": responses[b]}
             for i in range(args.prompts) for a, b in chosen_rejected)
    return {
        "texts": write_lines(os.path.join(work, "texts.jsonl"), ({"text": f"Review {i}:" + " film" * (text_tokens - 4)}
                                                                  for i in range(args.texts if with_texts else 1))),
        "pairs": write_lines(os.path.join(work, "pairs.jsonl"), pairs),
        "best": write_lines(os.path.join(work, "best.jsonl"), ({"prompt": prompt(i), "chosen": responses[0],
                                                                "rejected": responses[-1]} for i in range(args.prompts))),
        "prompts": write_lines(os.path.join(work, "prompts.jsonl"), ({"prompt": prompt(i)} for i in range(args.prompts))),
    }


# ----------------------------------------------------------------------------- the jobs

def job_options(cfg, paths, models) -> dict:
    """Each job's trainer (module) and options as frontier.py gives them, with the stand-ins in."""
    stand_in = {"init_from": models["policy"], "reward": models["reward"]}
    if cfg.trainer.get("eval_prompts"):
        stand_in["eval_prompts"] = paths["prompts"]
    jobs = {}
    if cfg.sft is not None:
        sft = frontier.sft_options(cfg)
        if sft.get("dataset") == "text":
            sft["data_path"] = paths["texts"]
        jobs["sft"] = (fsdp_train, cfg.trainer | sft | stand_in)
    for run in frontier.planned_runs(cfg, paths["pairs"], paths["best"]):
        if run["method"] not in jobs:  # every β (α, target KL, seed) of a method costs the same
            options = run["options"] | ({"ppo_reward": "rm:" + models["reward_model"]} if run["method"] == "ppo" else {})
            jobs[run["method"]] = (run["job"], cfg.trainer | options | stand_in)
    return jobs


def runs_per_method(cfg) -> dict:
    counts = {"sft": int(cfg.sft is not None), "pairs": 1}
    for run in frontier.planned_runs(cfg, "pairs.jsonl", "best.jsonl"):
        counts[run["method"]] = counts.get(run["method"], 0) + 1
    return counts


_loaded = {}  # what load_data gave, by the options it reads: the methods share their data


def plan(module, options) -> dict:
    """A full run's optimizer (PPO) steps and evaluations, as the trainer counts them."""
    prog = f"{module.__name__}.py"
    train_cfg = parse_args(frontier.as_argv(options | {"out_dir": "unused"}), prog=prog)
    key = json.dumps({k: options.get(k) for k in DATA_KEYS} | {"sft_on": train_cfg.objective == "sft" and
                                                                train_cfg.sft_on})
    if key not in _loaded:
        with contextlib.redirect_stdout(io.StringIO()):
            train_pairs, _, counts, _ = fsdp_train.load_data(train_cfg)
        _loaded[key] = len(train_pairs), counts
    n_train_pairs, counts = _loaded[key]
    items = counts["train_prompts"] if module is ppo_train else n_train_pairs
    _, _, last_step = fsdp_train.plan_steps(train_cfg, items)
    evaluated = bool(counts["eval_pairs"] or train_cfg.eval_prompts)
    between = (last_step - 1) // train_cfg.eval_every if train_cfg.eval_every and last_step else 0
    return {"steps": last_step, "evals": (2 + between) if evaluated else 0, "items": items}


def measure(name, module, options, n_steps, work) -> dict:
    """A short run of the job: median step_s after the warm-up, median eval/seconds, and the rest of
    its wall time (overhead), the warm-up steps' time above the median included."""
    out_dir = os.path.join(work, name)
    argv = frontier.as_argv(options | {"out_dir": out_dir, "max_steps": n_steps["warmup"] + n_steps["timed"],
                                       "eval_every": 0, "log_every": 1, "ckpt_every": 0})
    started, output = time.time(), io.StringIO()
    with contextlib.redirect_stdout(output):
        exit_code = module.run(argv)
    wall_s = time.time() - started
    with open(os.path.join(work, f"{name}.log"), "w") as f:
        f.write(output.getvalue())
    if exit_code != 0:
        raise RuntimeError(f"the {name} job failed (exit {exit_code}): {output.getvalue()[-2000:]}")
    lines = read_metrics(out_dir)
    steps = [line["step_s"] for line in lines if "step_s" in line]
    evals = [line["eval/seconds"] for line in lines if "eval/seconds" in line]
    step_s = statistics.median(steps[n_steps["warmup"]:])
    return {"step_s": step_s, "eval_s": statistics.median(evals) if evals else 0.0,
            # what a real run pays once: set-up, the export, and the warm-up steps' time above step_s
            "overhead_s": wall_s - len(steps) * step_s - sum(evals), "short_run_wall_s": wall_s, "steps_run": len(steps)}


def measure_pairs(cfg, paths, models, work, device) -> dict:
    """The pairs stage on one batch of prompts (after a small untimed one): seconds per prompt."""
    generation = frontier.generation_options(cfg)
    model = GPT.from_pretrained(models["policy"], device=device).eval()  # as frontier.pairs_stage loads it
    reward = load_reward(models["reward"], device=str(device))
    prompts = read_prompts(paths["prompts"])
    n_prompts = max(1, min(len(prompts), generation["batch_size"] // generation["k"]))
    generate_pairs(model, prompts[:1], reward, device=device, **generation)
    sync(device)
    started = time.time()
    generate_pairs(model, prompts[:n_prompts], reward, device=device, **generation)
    sync(device)
    return {"s_per_prompt": (time.time() - started) / n_prompts, "timed_prompts": n_prompts}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the table

def row_of(name, runs, plan_, timing) -> dict:
    seconds = (timing["s_per_prompt"] * plan_["items"] if name == "pairs" else
               timing["overhead_s"] + plan_["steps"] * timing["step_s"] + plan_["evals"] * timing["eval_s"])
    return {"job": name, "runs": runs, **plan_, **timing, "expected_s_per_run": seconds}


def table(rows) -> str:
    lines = ["| job | runs | steps | step_s | evals | eval_s | overhead_s | per run | all runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["job"] == "pairs":
            cells = [f"{r['items']:,} prompts", f"{r['s_per_prompt']:.3f}/prompt", "", "", ""]
        else:
            cells = [f"{r['steps']:,}", f"{r['step_s']:.3f}", f"{r['evals']}", f"{r['eval_s']:.2f}", f"{r['overhead_s']:.1f}"]
        lines.append(f"| {r['job']} | {r['runs']} | " + " | ".join(cells)
                     + f" | {hours(r['expected_s_per_run'])} | {hours(r['expected_s_per_run'] * r['runs'])} |")
    total = sum(r["expected_s_per_run"] * r["runs"] for r in rows)
    return "\n".join(lines + [f"\nall jobs: {hours(total)}"])


def hours(seconds) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 600 else f"{seconds:.0f} s"


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = frontier.read_config(args.config_file, check=False)
    wanted = args.jobs.split(",")
    if unknown := sorted(set(wanted) - set(JOBS)):
        raise ConfigError(f"--jobs: unknown {unknown}; known: {', '.join(JOBS)}")
    for name, least in (("steps", 1), ("ppo_steps", 1), ("warmup", 0), ("texts", 1), ("prompt_tokens", 1),
                        ("prompts", 0), ("text_tokens", 0), ("pairs_per_prompt", 0), ("response_tokens", 0)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    device = resolve_device(args.device)
    generation = frontier.generation_options(cfg)
    k = generation["k"]
    if not args.prompts and cfg.prompts != "demo" and not os.path.isfile(cfg.prompts):
        raise ConfigError(f"{cfg.prompts} (the config's prompts) is not here: give their number, --prompts N "
                          "(IMDb's train reviews give about 25,000)")
    args.prompts = args.prompts or len(frontier.prompt_texts(cfg))
    args.pairs_per_prompt = args.pairs_per_prompt or k * (k - 1) // 2
    shape = policy_shape(cfg.trainer["init_from"], cfg.trainer)
    sft_max_len = (cfg.trainer | (cfg.sft or {})).get("max_len", fsdp_train.TrainConfig().max_len)
    text_tokens = args.text_tokens or sft_max_len - 1
    runs = runs_per_method(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        print(f"stand-ins in {work}: a random-init {shape.n_layer}-layer {shape.n_embd}-wide policy, "
              f"{args.prompts:,} prompts x {args.pairs_per_prompt} pairs"
              + (f", {args.texts:,} texts of {text_tokens} tokens" if (cfg.sft or {}).get("dataset") == "text" else ""))
        if args.plan_only:  # the trainer's checks need the model directories to exist, not to hold weights
            models = {name: os.path.join(work, name) for name in ("policy", "reward_model")}
            models["reward"] = "vader"
        else:
            models = {"policy": save_model(shape, os.path.join(work, "policy")),
                      "reward_model": save_model(shape, os.path.join(work, "reward_model"), score_head=True, seed=1)}
            models["reward"] = ground_truth_reward(cfg.trainer["reward"], shape, args, work)
        paths = stand_in_data(work, args, k, args.response_tokens or generation["max_new_tokens"], text_tokens,
                              with_texts="sft" in wanted and (cfg.sft or {}).get("dataset") == "text")
        jobs = job_options(cfg, paths, models)
        for name in [job for job in JOBS if job in wanted and (job in jobs or job == "pairs")]:
            if args.plan_only:
                rows.append({"job": name, "runs": runs[name]} | ({"items": args.prompts} if name == "pairs" else
                                                                  plan(*jobs[name])))
                print(json.dumps(rows[-1]), flush=True)
                continue
            if name == "pairs":
                timing, plan_ = measure_pairs(cfg, paths, models, work, device), {"items": args.prompts}
            else:
                module, options = jobs[name]
                plan_ = plan(module, options)
                n_steps = {"warmup": 0 if module is ppo_train else args.warmup,
                           "timed": args.ppo_steps if module is ppo_train else args.steps}
                timing = measure(name, module, options, n_steps, work)
            rows.append(row_of(name, runs[name], plan_, timing))
            print(json.dumps(rows[-1]), flush=True)
    if args.plan_only:
        return {"rows": rows}
    print(table(rows))
    commit, dirty = git_state()
    result = {"benchmark": "frontier_time", "config_file": args.config_file, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_version": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(["python", "bench/frontier_time.py", *(argv if argv is not None else sys.argv[1:])]),
              "git_commit": commit, "git_uncommitted_files": dirty, "options": vars(args), "rows": rows,
              "total_expected_s": sum(r["expected_s_per_run"] * r["runs"] for r in rows)}
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.config_file))[0]
    path = os.path.join(args.results_dir, f"{device.type}-frontier_time-{stem}-{time.strftime('%Y%m%d')}.json")
    write_atomic(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
