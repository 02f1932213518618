"""The DPO paper's sentiment experiment (Sec. 6.1, App. C.1; Figure 2): the reward-KL frontier.

    python frontier.py --config_file config/frontier_demo.yaml

Stages, each a directory under out_dir (a relaunch skips the stages whose result is there):
  1. sft/          SFT of init_from on every response of the SFT data (the prompt set's language),
                   or none when init_from is already an SFT model (sft: null)
  2. pairs.jsonl   k completions per prompt sampled from the SFT model and ranked by the ground-truth
                   reward: all k(k-1)/2 pairs with distinct scores (generate_pairs.py)
  3. dpo_beta_*/   DPO from the SFT model on those pairs, one run per β
     preferred_ft/ the paper's preferred-FT baseline: SFT on each prompt's best completion
  4. frontier.json and frontier.png: each run's held-out reward (eval/reward) against its sequence-
     level KL(π || π_ref) (eval/kl), every eval_every steps, on the same held-out prompts (every
     run splits the same prompts with the same seed), with the SFT model's reward as the reference.

Every run is fsdp_train.py in this process, with the config's `trainer` options plus its stage's;
its own out_dir holds its metrics.jsonl, samples.md and final/ as usual.
"""
import argparse
import dataclasses
import inspect
import json
import os
import signal
import sys

from data.demo import demo_texts
from errors import ConfigError, InputError, Preempted, exit_code_of
import fsdp_train
from generate_pairs import check_generation_options, generate_pairs, read_prompts, write_jsonl
from gpt2 import GPT
from train.config import parse_args, read_yaml, shortened
from train.distributed import resolve_device
from train.preemption import StopRequests
from train.reward import fetch_reward, load_reward
from train.run_dir import final_dir, read_metrics, write_atomic


@dataclasses.dataclass
class FrontierConfig:
    out_dir: str
    trainer: dict           # fsdp_train options every run shares (model, precision, reward, eval settings)
    prompts: str            # "demo" (the demo set's prompts) or a JSONL/.txt prompt file (generate_pairs.py)
    sft: dict | None        # stage 1's fsdp_train options (objective sft, sft_on all), or None
    generation: dict        # generate_pairs options: k, max_new_tokens, temperature, seed, batch_size
    dpo: dict               # options of every DPO run
    betas: list             # one DPO run per β (the paper: 0.05, 0.1, 1, 5)
    preferred_ft: dict | None  # options of the preferred-FT run, or None for no baseline


def read_config(path) -> FrontierConfig:
    raw = read_yaml(path)
    fields = {f.name for f in dataclasses.fields(FrontierConfig)}
    defaults = {"sft": None, "preferred_ft": None, "betas": [0.05, 0.1, 1.0, 5.0], "generation": {}, "dpo": {}}
    if not isinstance(raw, dict) or set(raw) - fields or fields - set(raw) - set(defaults):
        raise ConfigError(f"{path}: expected the keys {sorted(fields)} ({sorted(defaults)} optional)")
    cfg = FrontierConfig(**(defaults | raw))
    check_frontier_config(cfg, path)
    return cfg


def check_frontier_config(cfg: FrontierConfig, path):
    """Everything a stage would refuse later, refused now in one line naming the file: the sections'
    types, the generation options, the β list, every run's trainer options, the prompts, the reward."""
    for name in ("trainer", "generation", "dpo", "sft", "preferred_ft"):
        value = getattr(cfg, name)
        if not isinstance(value, dict) and not (value is None and name in ("sft", "preferred_ft")):
            raise ConfigError(f"{path}: {name} must be a mapping of options, got {type(value).__name__}")
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir:
        raise ConfigError(f"{path}: out_dir must name a directory")
    if not cfg.trainer.get("reward"):
        raise ConfigError(f"{path}: trainer.reward must name the ground-truth reward (train/reward.py)")
    if not cfg.trainer.get("init_from"):
        raise ConfigError(f"{path}: trainer.init_from must name the starting model (a hub id or a directory)")
    if unknown := set(cfg.generation) - set(inspect.signature(check_generation_options).parameters):
        raise ConfigError(f"{path}: generation: unknown keys {sorted(unknown)}; known: "
                          f"{sorted(inspect.signature(check_generation_options).parameters)}")
    try:
        check_generation_options(**cfg.generation)
    except InputError as err:
        raise ConfigError(f"{path}: generation: {err}") from None
    if not (isinstance(cfg.betas, list) and cfg.betas and all(
            type(b) in (int, float) and 0 < b < float("inf") for b in cfg.betas)):
        raise ConfigError(f"{path}: betas must be a list of numbers > 0, got {shortened(cfg.betas)}")
    stages = [{"objective": "sft", "sft_on": "all"} | (cfg.sft or {})]
    stages += [{"objective": "dpo", "beta": beta} | cfg.dpo for beta in cfg.betas]
    stages += [{"objective": "sft"} | cfg.preferred_ft] if cfg.preferred_ft is not None else []
    for options in stages:  # the trainer's own checks, with the demo set standing in for pairs not made yet
        parse_args(as_argv(cfg.trainer | options | {"dataset": "demo", "out_dir": cfg.out_dir}))
    prompt_texts(cfg)
    fetch_reward(cfg.trainer["reward"])  # its form, its package, and a classifier's files, before any stage


def as_argv(options: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in options.items()]


def stop_between_stages(signum, frame):
    raise Preempted(signum, f"stopped by {signal.Signals(signum).name}; every finished stage is kept: run the same "
                            "command to go on")


def train(cfg: FrontierConfig, name, options, log):
    """One fsdp_train run in out_dir/name (resumed or left alone if it is already there)."""
    argv = as_argv(cfg.trainer | options | {"out_dir": os.path.join(cfg.out_dir, name)})
    log(f"== {name}: python fsdp_train.py {' '.join(argv)}")
    stop_requests = StopRequests()
    exit_code = fsdp_train.run(argv, stop_requests)
    if exit_code == 2:
        raise ConfigError(f"the {name} run stopped on bad input (the error above)")
    if exit_code > 128:  # SIGTERM/SIGINT: the run saved a checkpoint
        raise Preempted(exit_code - 128, f"the {name} run was stopped by {signal.Signals(exit_code - 128).name} "
                                         "after a checkpoint: run the same command to go on")
    if exit_code != 0:
        raise RuntimeError(f"the {name} run failed with exit code {exit_code} (its messages are above)")
    if stop_requests.received:  # came during the run's last step or its end, which it finished
        raise Preempted(stop_requests.received, f"stopped by {signal.Signals(stop_requests.received).name} as the "
                                                f"{name} run ended (it is complete): run the same command to go on")
    return final_dir(os.path.join(cfg.out_dir, name))


# ----------------------------------------------------------------------------- the stages

def sft_stage(cfg, log) -> str:
    if cfg.sft is None:
        return cfg.trainer["init_from"]
    return train(cfg, "sft", {"objective": "sft", "sft_on": "all", "kl_samples": 0, "n_samples": 0} | cfg.sft, log)


def prompt_texts(cfg) -> list[str]:
    if cfg.prompts == "demo":
        return [prompt for prompt, _, _ in demo_texts()]  # the 128 prompts of dataset: demo
    return read_prompts(cfg.prompts)


def pairs_stage(cfg, sft_model, log):
    pairs_path, best_path = (os.path.join(cfg.out_dir, name) for name in ("pairs.jsonl", "best.jsonl"))
    if os.path.exists(pairs_path) and os.path.exists(best_path):
        log(f"== pairs: reusing {pairs_path}")
        return pairs_path, best_path
    device = resolve_device("cpu" if cfg.trainer.get("device") == "cpu" else "auto")
    model = GPT.from_pretrained(sft_model, device=device).eval()
    prompts = prompt_texts(cfg)
    log(f"== pairs: {cfg.generation.get('k', 4)} samples for each of {len(prompts)} prompts from {sft_model}")
    records, counts, best = generate_pairs(model, prompts, load_reward(cfg.trainer["reward"], device=str(device)),
                                           device=device, **cfg.generation)
    write_jsonl(best_path, best)
    write_jsonl(pairs_path, records)  # last: its presence means both are complete
    log(f"wrote {pairs_path}: {json.dumps(counts)}")
    return pairs_path, best_path


def runs_stage(cfg, sft_model, pairs_path, best_path, log) -> list[dict]:
    """Each run's (method, beta, out_dir); the runs are trained on the way."""
    data = {"init_from": sft_model, "dataset": "jsonl"}
    runs = []
    for beta in cfg.betas:
        name = f"dpo_beta_{beta:g}"
        train(cfg, name, data | {"data_path": pairs_path, "objective": "dpo", "beta": beta} | cfg.dpo, log)
        runs.append({"method": "dpo", "beta": beta, "dir": os.path.join(cfg.out_dir, name)})
    if cfg.preferred_ft is not None:
        train(cfg, "preferred_ft", data | {"data_path": best_path, "objective": "sft"} | cfg.preferred_ft, log)
        runs.append({"method": "preferred_ft", "beta": None, "dir": os.path.join(cfg.out_dir, "preferred_ft")})
    return runs


# ----------------------------------------------------------------------------- the frontier

def eval_points(run_dir) -> list[dict]:
    """(step, kl, reward) of every eval line of a run's metrics.jsonl."""
    points = [{"step": record["step"], "kl": record["eval/kl"], "reward": record["eval/reward"]}
              for record in read_metrics(run_dir) if "eval/reward" in record and "eval/kl" in record]
    if not points:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no eval line with eval/kl and eval/reward")
    return points


def frontier(runs) -> dict:
    """The JSON of Figure 2. The reference's reward is a step-0 eval (policy = reference, kl 0)."""
    result = {"reference": None, "runs": []}
    for run in runs:
        points = eval_points(run["dir"])
        if points[0]["step"] == 0 and result["reference"] is None:
            result["reference"] = {"reward": points[0]["reward"]}
        result["runs"].append({"method": run["method"], "beta": run["beta"], "points": points})
    return result


def run_label(run) -> str:
    return f"DPO β={run['beta']:g}" if run["method"] == "dpo" else "Preferred-FT"


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e \".[plot]\"): frontier.png not drawn"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for run in result["runs"]:
        points = sorted(run["points"], key=lambda p: p["kl"])
        ax.plot([p["kl"] for p in points], [p["reward"] for p in points], "o-", ms=3, label=run_label(run))
    if result["reference"] is not None:
        ax.axhline(result["reference"]["reward"], color="gray", ls="--", lw=1, label="SFT (reference)")
    ax.set_xlabel("KL(π || π_ref), sequence level")
    ax.set_ylabel("reward (held-out samples)")
    ax.set_title("Reward-KL frontier (DPO paper, Fig. 2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return f"wrote {path}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file", required=True, help="the frontier's YAML (config/frontier_demo.yaml)")
    p.add_argument("--out_dir", default="", help="override the config's out_dir")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("frontier.py runs its stages one after another in one process, each training run an FSDP "
                          "job of its own: launch it with python, not torchrun --nproc_per_node N")
    previous = {signum: signal.signal(signum, stop_between_stages)  # between runs; each run handles its own
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_stages(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_stages(args):
    cfg = read_config(args.config_file)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    os.makedirs(cfg.out_dir, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    sft_model = sft_stage(cfg, log)
    pairs_path, best_path = pairs_stage(cfg, sft_model, log)
    runs = runs_stage(cfg, sft_model, pairs_path, best_path, log)
    result = frontier(runs)
    write_atomic(os.path.join(cfg.out_dir, "frontier.json"), json.dumps(result, indent=1))
    log(summary(result))
    log(plot(result, os.path.join(cfg.out_dir, "frontier.png")))


def summary(result) -> str:
    lines = [f"reference (SFT) reward {result['reference']['reward']:.3f}" if result["reference"] else "",
             "| run | final step | KL | reward | best reward (at KL) |", "| --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        last, best = run["points"][-1], max(run["points"], key=lambda q: q["reward"])
        lines.append(f"| {run_label(run)} | {last['step']} | {last['kl']:.2f} | {last['reward']:.3f} | "
                     f"{best['reward']:.3f} ({best['kl']:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
