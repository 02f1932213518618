"""The DPO paper's sentiment experiment (Sec. 6.1, App. C.1; Figure 2): the reward-KL frontier.

    python frontier.py --config_file config/frontier_demo.yaml

Stages, each a directory or file under out_dir; a relaunch goes on from what is done:
  1. sft/          SFT of init_from on every response of the SFT data (the prompt set's language),
                   or none when init_from is already an SFT model (sft: null)
  2. pairs.jsonl   k completions per prompt sampled from the SFT model and ranked by the ground-truth
                   reward: all k(k-1)/2 pairs with distinct scores (generate_pairs.py); pairs.json
                   records what made them, and a relaunch whose inputs differ is refused
  3. per seed:     dpo_beta_*_seed_*/          DPO from the SFT model on those pairs, one run per β
                   unlikelihood_alpha_*_seed_*/ the paper's unlikelihood baseline, one run per α
                   preferred_ft_seed_*/         the paper's preferred-FT baseline: SFT on each prompt's
                                                best completion
                   reward_model_seed_*/         a reward model of the pairs (fsdp_train.py, objective
                                                reward_model); its held-out accuracy is against the
                                                ground-truth ordering
                   ppo_rm_kl_*_seed_*/          PPO (ppo_train.py) on that reward model, one run per
                                                target KL
                   ppo_gt_kl_*_seed_*/          PPO-GT: the same on the ground-truth reward
  4. frontier.json and frontier.png: each run's held-out reward (eval/reward) against its sequence-
     level KL(π || π_ref) (eval/kl, the sum of per-position KLs), every eval_every steps, on held-out
     prompts split by the run's seed; each method's mean over seeds with the standard error across
     seeds; the SFT model's reward as the reference; and how many points of the other methods a
     DPO point dominates (at least their reward at no more KL).

Every run is fsdp_train.py (ppo_train.py for PPO) in this process, with the config's `trainer` options
plus its stage's;
its own out_dir holds its metrics.jsonl, samples.md and final/ as usual, and a relaunch resumes it
(or refuses, if its options or data changed: the trainer's run identity). One frontier per out_dir.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import signal
import statistics
import sys

from data.demo import demo_texts
from errors import ConfigError, InputError, Preempted, exit_code_of
import fsdp_train
import ppo_train
from data.records import read_prompts
from generate_pairs import check_generation_options, generate_pairs, write_jsonl
from gpt2 import GPT
from train.config import TrainConfig, parse_args, read_yaml, shortened
from train.distributed import resolve_device, weights_fingerprint
from train.preemption import StopRequests
from train.reward import fetch_reward, load_reward
from train.run_dir import final_dir, held_run_dirs, lock_run_dir, read_metrics, unlock_run_dirs, write_atomic


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
    unlikelihood: dict | None  # options of every unlikelihood run, or None for no such baseline
    alphas: list            # one unlikelihood run per α (the paper: 0.05, 0.1, 0.5, 1)
    reward_model: dict | None  # fsdp_train options of the reward model (objective reward_model), or None: no PPO
    ppo: dict | None        # ppo_train options of every PPO and PPO-GT run, or None for neither
    target_kls: list        # one PPO and one PPO-GT run per target KL (the paper: 3, 6, 9, 12)
    seeds: list             # every run above once per seed (the trainer's seed: split, order, samples)


def read_config(path, check=True) -> FrontierConfig:
    """The config file, checked (check_frontier_config) unless check is False: bench/frontier_time.py
    reads it on a machine without its files and runs each job on stand-ins, which the trainer checks."""
    raw = read_yaml(path)
    fields = {f.name for f in dataclasses.fields(FrontierConfig)}
    defaults = {"sft": None, "preferred_ft": None, "betas": [0.05, 0.1, 1.0, 5.0], "generation": {}, "dpo": {},
                "unlikelihood": None, "alphas": [0.05, 0.1, 0.5, 1.0], "seeds": [0], "reward_model": None,
                "ppo": None, "target_kls": [3.0, 6.0, 9.0, 12.0]}
    if not isinstance(raw, dict) or set(raw) - fields or fields - set(raw) - set(defaults):
        raise ConfigError(f"{path}: expected the keys {sorted(fields)} ({sorted(defaults)} optional)")
    cfg = FrontierConfig(**(defaults | raw))
    if check:
        check_frontier_config(cfg, path)
    return cfg


def check_frontier_config(cfg: FrontierConfig, path):
    """Everything a stage would refuse later, refused now in one line naming the file: the sections'
    types, the generation options, the β list, every run's trainer options, the prompts, the reward."""
    optional = ("sft", "preferred_ft", "unlikelihood", "reward_model", "ppo")
    for name in ("trainer", "generation", "dpo") + optional:
        value = getattr(cfg, name)
        if not isinstance(value, dict) and not (value is None and name in optional):
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
    if (cfg.ppo is None) != (cfg.reward_model is None):
        raise ConfigError(f"{path}: ppo and reward_model go together (PPO runs on the reward model; PPO-GT beside it)")
    for name, keys in SET_PER_RUN.items():  # a section that set these would give every run of its series one value
        if set_here := sorted(set(getattr(cfg, name) or {}) & set(keys)):
            raise ConfigError(f"{path}: {name}: {', '.join(set_here)} is set per run by frontier.py (betas, alphas, "
                              "target_kls, the stage); remove it from the section")
    if cfg.reward_model is not None and (cfg.trainer | cfg.reward_model).get("eval_fraction",
                                                                            TrainConfig().eval_fraction) == 0:
        raise ConfigError(f"{path}: the reward model needs held-out pairs for its accuracy: give reward_model an "
                          "eval_fraction > 0")
    for name in ("betas", "alphas", "target_kls"):
        values = getattr(cfg, name)
        if not (isinstance(values, list) and values and all(
                type(v) in (int, float) and 0 < v < float("inf") for v in values)):
            raise ConfigError(f"{path}: {name} must be a list of numbers > 0, got {shortened(values)}")
    if not (isinstance(cfg.seeds, list) and cfg.seeds and len(set(cfg.seeds)) == len(cfg.seeds)
            and all(type(seed) is int and seed >= 0 for seed in cfg.seeds)):
        raise ConfigError(f"{path}: seeds must be a list of distinct integers >= 0, got {shortened(cfg.seeds)}")
    stages = [(fsdp_train, sft_options(cfg))]  # on its own data (text, demo)
    stages += [(run["job"], run["options"] | {"dataset": "demo"})  # the demo set standing in for pairs not made yet
               for run in planned_runs(cfg, "pairs.jsonl", "best.jsonl")]
    for job, options in stages:  # the trainer's own checks
        parse_args(as_argv(cfg.trainer | options | {"out_dir": cfg.out_dir}), prog=f"{job.__name__}.py")
    prompt_texts(cfg)
    fetch_reward(cfg.trainer["reward"])  # its form, its package, and a classifier's files, before any stage


SET_PER_RUN = {"sft": ("objective",), "dpo": ("objective", "beta"), "unlikelihood": ("objective", "unlikelihood_alpha"),
               "preferred_ft": ("objective", "data_path"), "reward_model": ("objective",),
               "ppo": ("objective", "ppo_reward", "target_kl"), "trainer": ("objective", "beta", "unlikelihood_alpha",
                                                                           "ppo_reward", "target_kl", "seed")}


def as_argv(options: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in options.items()]


def stop_between_stages(signum, frame):
    raise Preempted(signum, f"stopped by {signal.Signals(signum).name}; every finished stage is kept: run the same "
                            "command to go on")


def train(cfg: FrontierConfig, name, options, log, job=fsdp_train):
    """One run of job (fsdp_train, or ppo_train) in out_dir/name (resumed or left alone if it is already there)."""
    argv = as_argv(cfg.trainer | options | {"out_dir": os.path.join(cfg.out_dir, name)})
    log(f"== {name}: python {job.__name__}.py {' '.join(argv)}")
    stop_requests = StopRequests()
    exit_code = job.run(argv, stop_requests)
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

def sft_options(cfg) -> dict:
    """Stage 1's options (over the trainer's): SFT on every response (or text) of its data, with no
    samples or KL (nothing to compare the starting weights with)."""
    return {"objective": "sft", "sft_on": "all", "kl_samples": 0, "n_samples": 0} | (cfg.sft or {})


def sft_stage(cfg, log) -> str:
    if cfg.sft is None:
        return cfg.trainer["init_from"]
    return train(cfg, "sft", sft_options(cfg), log)


def prompt_texts(cfg) -> list[str]:
    if cfg.prompts == "demo":
        return [prompt for prompt, _, _ in demo_texts()]  # the 128 prompts of dataset: demo
    return read_prompts(cfg.prompts)


def pairs_stage(cfg, sft_model, log):
    """pairs.jsonl and best.jsonl, sampled from the SFT model and ranked by the reward, with pairs.json
    recording what made them (the SFT weights, the prompts, the generation options, the reward). A
    relaunch reuses them only when that record matches, and otherwise refuses, naming what changed:
    every run after this stage was trained on them."""
    paths = {name: os.path.join(cfg.out_dir, name) for name in ("pairs.jsonl", "best.jsonl", "pairs.json")}
    device = resolve_device("cpu" if cfg.trainer.get("device") == "cpu" else "auto")
    model = GPT.from_pretrained(sft_model, device=device).eval()
    prompts = prompt_texts(cfg)
    made_from = {"sft_weights_sha256": weights_fingerprint(model.state_dict()),
                 "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                 "generation": generation_options(cfg), "reward": cfg.trainer["reward"]}
    if os.path.exists(paths["pairs.jsonl"]):
        check_made_from(paths, made_from)
        log(f"== pairs: reusing {paths['pairs.jsonl']} (made from the same inputs)")
        return paths["pairs.jsonl"], paths["best.jsonl"]
    log(f"== pairs: {made_from['generation']['k']} samples for each of {len(prompts)} prompts from {sft_model}")
    records, counts, best = generate_pairs(model, prompts, load_reward(cfg.trainer["reward"], device=str(device)),
                                           device=device, **made_from["generation"])
    write_atomic(paths["pairs.json"], json.dumps(made_from, indent=1))
    write_jsonl(paths["best.jsonl"], best)
    write_jsonl(paths["pairs.jsonl"], records)  # last: its presence means the stage is complete
    log(f"wrote {paths['pairs.jsonl']}: {json.dumps(counts)}")
    return paths["pairs.jsonl"], paths["best.jsonl"]


def generation_options(cfg) -> dict:
    """The generation options in full: the config's over generate_pairs' defaults."""
    defaults = {name: parameter.default for name, parameter in
                inspect.signature(check_generation_options).parameters.items()}
    return defaults | cfg.generation


def check_made_from(paths, made_from):
    try:
        with open(paths["pairs.json"], encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{paths['pairs.jsonl']} is there without a readable record of what made it "
                          f"({paths['pairs.json']}: {err}); use another out_dir, or delete it and the runs "
                          "trained on it") from None
    if recorded != made_from:
        changed = [key for key in made_from if recorded.get(key) != made_from[key]]
        if "generation" in changed:
            changed[changed.index("generation")] = ", ".join(
                f"generation.{key}: {recorded.get('generation', {}).get(key)!r} -> {value!r}"
                for key, value in made_from["generation"].items() if recorded.get("generation", {}).get(key) != value)
        raise ConfigError(f"{paths['pairs.jsonl']} was made from other inputs ({'; '.join(changed)}): every run "
                          "in this out_dir was trained on it. Use another out_dir, or delete pairs.jsonl, "
                          "best.jsonl and the runs to make them again")


def planned_runs(cfg, pairs_path, best_path) -> list[dict]:
    """Every training run of the frontier, per seed: DPO at each β and unlikelihood at each α on the
    pairs, preferred-FT on each prompt's best sample, a reward model of the pairs and PPO on it and
    PPO-GT at each target KL. Each: method, beta, alpha, target_kl, seed, name, options, job (the
    module whose run() trains it)."""
    runs = []
    for seed in cfg.seeds:
        data = {"dataset": "jsonl", "seed": seed}
        pairs = data | {"data_path": pairs_path}
        for beta in cfg.betas:
            runs.append(planned("dpo", seed, f"dpo_beta_{beta:g}", pairs | {"objective": "dpo", "beta": beta} | cfg.dpo,
                                beta=beta))
        for alpha in cfg.alphas if cfg.unlikelihood is not None else []:
            runs.append(planned("unlikelihood", seed, f"unlikelihood_alpha_{alpha:g}", pairs | {
                "objective": "unlikelihood", "unlikelihood_alpha": alpha} | cfg.unlikelihood, alpha=alpha))
        if cfg.preferred_ft is not None:
            runs.append(planned("preferred_ft", seed, "preferred_ft",
                                data | {"data_path": best_path, "objective": "sft"} | cfg.preferred_ft))
        if cfg.ppo is not None:
            runs.append(planned("reward_model", seed, "reward_model", pairs | {
                "objective": "reward_model", "kl_samples": 0, "n_samples": 0} | cfg.reward_model))
            reward_model = "rm:" + final_dir(os.path.join(cfg.out_dir, f"reward_model_seed_{seed}"))
            for target in cfg.target_kls:
                for method, reward in (("ppo", reward_model), ("ppo_gt", "")):  # "": the ground truth, `reward`
                    runs.append(planned(method, seed, f"{RUN_NAMES[method]}_kl_{target:g}",
                                        pairs | {"ppo_reward": reward, "target_kl": target} | cfg.ppo, job=ppo_train,
                                        target_kl=target))
    return runs


RUN_NAMES = {"ppo": "ppo_rm", "ppo_gt": "ppo_gt"}


def planned(method, seed, name, options, job=fsdp_train, beta=None, alpha=None, target_kl=None) -> dict:
    return {"method": method, "beta": beta, "alpha": alpha, "target_kl": target_kl, "seed": seed,
            "name": f"{name}_seed_{seed}", "options": options, "job": job}


SERIES_KEYS = ("method", "beta", "alpha", "target_kl")


def runs_stage(cfg, sft_model, pairs_path, best_path, log) -> list[dict]:
    """Each run's method, beta, alpha, target_kl, seed and out_dir; the runs are trained on the way."""
    runs = []
    for run in planned_runs(cfg, pairs_path, best_path):
        train(cfg, run["name"], {"init_from": sft_model} | run["options"], log, run["job"])
        runs.append({key: run[key] for key in SERIES_KEYS + ("seed",)} | {"dir": os.path.join(cfg.out_dir, run["name"])})
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
    """The JSON of Figure 2: every run's points; each series (method and β, α or target KL) as the mean
    over its seeds at each eval step, with the standard error across seeds; the reference's reward (a
    step-0 eval, policy = reference, kl 0) per seed and its mean; the reward models' held-out accuracy;
    and the dominance count."""
    result = {"reference": {"per_seed": {}}, "runs": [], "series": []}
    for run in runs:
        if run["method"] == "reward_model":  # not a point of the figure: what PPO optimised
            accuracy = reward_model_accuracy(run["dir"])
            result.setdefault("reward_model", {"per_seed": {}})["per_seed"][str(run["seed"])] = accuracy
            continue
        points = eval_points(run["dir"])
        if points[0]["step"] == 0:
            result["reference"]["per_seed"].setdefault(str(run["seed"]), points[0]["reward"])
        result["runs"].append({key: run[key] for key in SERIES_KEYS + ("seed",)} | {"points": points})
    per_seed = list(result["reference"]["per_seed"].values())
    result["reference"]["reward"] = sum(per_seed) / len(per_seed) if per_seed else None
    if "reward_model" in result:
        result["reward_model"]["accuracy"] = statistics.fmean(result["reward_model"]["per_seed"].values())
    for key in dict.fromkeys(tuple(r[k] for k in SERIES_KEYS) for r in result["runs"]):
        members = [r for r in result["runs"] if tuple(r[k] for k in SERIES_KEYS) == key]
        result["series"].append(dict(zip(SERIES_KEYS, key))
                                | {"seeds": [r["seed"] for r in members], "points": mean_points(members)})
    result["dominance"] = dominance(result["series"])
    return result


def reward_model_accuracy(run_dir) -> float:
    """A reward model's final held-out accuracy: its chosen response scored above the rejected one, on
    pairs ranked by the ground-truth reward."""
    lines = [r for r in read_metrics(run_dir) if "eval/rewards/accuracies" in r]
    if not lines:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no eval/rewards/accuracies line")
    return lines[-1]["eval/rewards/accuracies"]


def mean_points(members) -> list[dict]:
    """At each step every seed evaluated: the mean kl and reward, and their standard errors across
    seeds (sample standard deviation / sqrt(seeds); None with one seed)."""
    steps = sorted(set.intersection(*({p["step"] for p in run["points"]} for run in members)))
    points = []
    for step in steps:
        at_step = [next(p for p in run["points"] if p["step"] == step) for run in members]
        point = {"step": step}
        for name in ("kl", "reward"):
            values = [p[name] for p in at_step]
            point[name] = statistics.fmean(values)
            point[f"{name}_stderr"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        points.append(point)
    return points


def dominance(series) -> dict:
    """The paper's claim (Sec. 6.1): DPO's frontier dominates the other methods'. For each point of a
    non-DPO series after step 0 (its mean over seeds), whether some point of a DPO series (any β, any
    step) has at least its reward at no more KL."""
    dpo = [p for s in series if s["method"] == "dpo" for p in s["points"]]
    not_dominated = [{"series": series_label(s), "step": p["step"], "kl": p["kl"], "reward": p["reward"]}
                     for s in series if s["method"] != "dpo" for p in s["points"] if p["step"] > 0
                     and not any(q["reward"] >= p["reward"] and q["kl"] <= p["kl"] for q in dpo)]
    checked = sum(p["step"] > 0 for s in series if s["method"] != "dpo" for p in s["points"])
    return {"dominated": checked - len(not_dominated), "of": checked, "not_dominated": not_dominated}


def series_label(series) -> str:
    if series["method"] == "dpo":
        return f"DPO β={series['beta']:g}"
    if series["method"] == "unlikelihood":
        return f"Unlikelihood α={series['alpha']:g}"
    if series["method"] in ("ppo", "ppo_gt"):
        return f"{'PPO' if series['method'] == 'ppo' else 'PPO-GT'} target KL={series['target_kl']:g}"
    return "Preferred-FT"


STYLES = {"dpo": "o-", "unlikelihood": "s--", "preferred_ft": "^:", "ppo": "d-.", "ppo_gt": "v-."}
COLOURS = {"dpo": "Blues", "unlikelihood": "Greens", "preferred_ft": "Greys", "ppo": "Oranges", "ppo_gt": "Reds"}


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e \".[plot]\"): frontier.png not drawn"
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for series in result["series"]:
        points = series["points"]  # in step order: each series' path as training goes on
        same_method = [s for s in result["series"] if s["method"] == series["method"]]
        shade = 0.45 + 0.5 * same_method.index(series) / max(1, len(same_method) - 1)  # one colour family a method
        ax.errorbar([p["kl"] for p in points], [p["reward"] for p in points], fmt=STYLES[series["method"]],
                    color=plt.get_cmap(COLOURS[series["method"]])(shade), ms=3, capsize=2, lw=1,
                    xerr=[p["kl_stderr"] or 0 for p in points], yerr=[p["reward_stderr"] or 0 for p in points],
                    label=series_label(series))
    if result["reference"]["reward"] is not None:
        ax.axhline(result["reference"]["reward"], color="gray", ls="--", lw=1, label="SFT (reference)")
    seeds = max(len(s["seeds"]) for s in result["series"])
    ax.set_xlabel("KL(π || π_ref), sequence level (sum of per-position KLs)")
    ax.set_ylabel("reward (held-out samples)")
    ax.set_title("Reward-KL frontier (DPO paper, Fig. 2)" + (
        f"\nmean of {seeds} seeds, bars ±1 standard error across seeds" if seeds > 1 else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    log = lambda message: print(message, flush=True)  # noqa: E731
    locked_before = len(held_run_dirs())
    lock_run_dir(cfg.out_dir, log)  # one frontier per directory (each run also locks its own)
    try:
        sft_model = sft_stage(cfg, log)
        pairs_path, best_path = pairs_stage(cfg, sft_model, log)
        runs = runs_stage(cfg, sft_model, pairs_path, best_path, log)
        result = frontier(runs)
        write_atomic(os.path.join(cfg.out_dir, "frontier.json"), json.dumps(result, indent=1))
        log(summary(result))
        log(plot(result, os.path.join(cfg.out_dir, "frontier.png")))
    finally:
        unlock_run_dirs(keep=locked_before)


def summary(result) -> str:
    """The table of each series' last point and best point (means over seeds, ± standard error
    across seeds), and the dominance count."""
    def value(point, name, digits):
        stderr = point[f"{name}_stderr"]
        return f"{point[name]:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr is not None else "")

    reference = result["reference"]["reward"]
    lines = [f"reference (SFT) reward {reference:.3f}" if reference is not None else ""]
    if "reward_model" in result:
        lines.append(f"reward model: held-out accuracy against the ground-truth ordering "
                     f"{result['reward_model']['accuracy']:.3f} (per seed: "
                     + ", ".join(f"{v:.3f}" for v in result["reward_model"]["per_seed"].values()) + ")")
    lines += ["| run | seeds | final step | KL | reward | best reward (at KL) |", "| --- | --- | --- | --- | --- | --- |"]
    for series in result["series"]:
        last, best = series["points"][-1], max(series["points"], key=lambda q: q["reward"])
        lines.append(f"| {series_label(series)} | {len(series['seeds'])} | {last['step']} | {value(last, 'kl', 2)} | "
                     f"{value(last, 'reward', 3)} | {best['reward']:.3f} ({best['kl']:.2f}) |")
    counted = result["dominance"]
    lines.append(f"dominance: {counted['dominated']} of {counted['of']} points of the other methods (after step 0, "
                 "means over seeds) have a DPO point with at least their reward at no more KL")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
