"""The trainer's configuration: one dataclass, YAML files under config/, `--key=value` overrides.

Every key is a field below with its default and meaning; `python fsdp_train.py --help` prints
them. Unknown keys and values of the wrong type are refused with a message naming the file or
flag, before anything is written or any weights are loaded.
"""
import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
from dataclasses import dataclass, field

import yaml

from data.batches import check_batch_sizes, check_eval_fraction, check_lengths
from data.formats import HUB_FORMATS, KINDS
from dpo import LOSS_TYPES, check_loss_settings
from errors import ConfigError
from gpt2 import GPTConfig, HEAD_PRECISIONS
from train.reward import SPEC_HELP, check_reward_spec

DATASETS = KINDS + ("text",)  # the preference formats, and plain text for SFT (data/texts.py)


def option(default, help, identity=False):
    """A config field: its default, its --help text, and whether it fixes the run's trajectory (its
    identity: a checkpoint is resumed only by a run that agrees on every such field, run_identity_keys)."""
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass
class TrainConfig:
    # --- run
    out_dir: str = option("out/run", "run directory: metrics.jsonl, samples.md, checkpoints/, final/, config.yaml")
    seed: int = option(0, "seed for the split, the data order, init from scratch and sampling", identity=True)
    device: str = option("auto", "cpu, cuda or auto (cuda when available); picks nccl or gloo")
    wandb_log: bool = option(False, "also send metrics to Weights & Biases (pip install wandb)")
    wandb_project: str = option("gpt2-dpo", "W&B project name")
    # --- model
    init_from: str = option("gpt2", "starting weights: a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, org/name), "
                            "a local directory with config.json + model.safetensors, or 'scratch'", identity=True)
    n_layer: int = option(2, "layers, with init_from=scratch", identity=True)
    n_head: int = option(2, "attention heads, with init_from=scratch", identity=True)
    n_embd: int = option(64, "width, with init_from=scratch", identity=True)
    n_positions: int = option(128, "context length, with init_from=scratch", identity=True)
    # --- data
    dataset: str = option("demo", f"data format: one of {', '.join(DATASETS)} (demo needs no file; jsonl reads TRL's "
                          "explicit, implicit-prompt and conversational records; hub reads a dataset repo; text: "
                          "records with a \"text\" string, plain text for objective sft, e.g. IMDb's reviews)")
    data_path: str = option("", "file to read (lm_human_preferences: a path, or 'sentiment'/'descriptiveness' to "
                            "download OpenAI's offline_5k.json; hub: 'org/name', 'org/name/subdir' or a local "
                            "directory); ignored for demo")
    split: str = option("train", "hub: the split whose files are read (train.jsonl, train-*.parquet, train/...)")
    data_revision: str = option("", "hub: the dataset repo's branch, tag or commit ('' = main)")
    hub_format: str = option("jsonl", f"hub: read the records as {' or '.join(HUB_FORMATS)} (HH-RLHF dialogues)")
    append_eos: str = option("auto", "end every chosen and rejected response with <|endoftext|> (50256) and score "
                             "it, as the DPO authors' code and TRL do: true, false, or auto (true for jsonl, hh, "
                             "hub, demo and text; false for lm_human_preferences, whose samples are cut mid-text)")
    max_records: int = option(0, "lm_human_preferences and text: keep only the first N records (0 = all; OpenAI "
                              "trained on 4992 of offline_5k)")
    max_prompt_len: int = option(64, "prompt tokens kept; longer prompts keep their LAST tokens (the recent context)")
    max_len: int = option(88, "prompt + response tokens; responses are cut to max_len - prompt length")
    eval_fraction: float = option(0.05, "fraction of prompts (groups) held out for evaluation", identity=True)
    # --- objective
    objective: str = option("dpo", "dpo; sft: maximise the likelihood of the chosen responses; unlikelihood "
                            "(the paper's baseline): that, and push down each rejected token (unlikelihood_alpha); "
                            "reward_model: a Bradley-Terry reward model of the pairs (a score head, exported as "
                            "GPT2ForSequenceClassification); ppo: PPO on `reward` (ppo_train.py, its own command)",
                            identity=True)
    unlikelihood_alpha: float = option(1.0, "unlikelihood: the weight of the rejected tokens' -log(1 - p) (the "
                                       "paper's alpha, in 0.05-1)", identity=True)
    loss_type: str = option("sigmoid", f"DPO loss: one of {', '.join(LOSS_TYPES)} (see README)", identity=True)
    beta: float = option(0.1, "DPO's beta: strength of the KL penalty towards the reference", identity=True)
    label_smoothing: float = option(0.0, "assumed label-flip rate eps in [0, 0.5) for sigmoid (cDPO) and robust",
                                    identity=True)
    reference_free: bool = option(False, "take the reference log-probs as 0 (no reference model)", identity=True)
    logps: str = option("auto", "sequence log-prob: sum over response tokens, mean per token, or auto "
                        "(mean for ipo, as the IPO paper; sum otherwise, as DPO)", identity=True)
    sft_steps: int = option(0, "dpo: first train the starting weights with SFT on every response of the training pairs "
                            "(the data's language) for this many steps, in the same run; the result (out_dir/sft/) "
                            "is DPO's starting point and reference, as in the paper (0 = no warm start)", identity=True)
    sft_lr: float = option(0.0, "learning rate of the SFT warm start (0 = lr)", identity=True)
    sft_on: str = option("chosen", "sft: train on the chosen responses (preferred-FT, the paper's baseline) or on "
                         "all: every distinct response, preferred or not (the data's language, as the warm start)",
                         identity=True)
    precompute_reference: bool = option(False, "compute the reference log-probs of every pair once before "
                                        "training, cache them in out_dir, and hold no reference model")
    # --- PPO (ppo_train.py): batch_size prompts per rollout batch, each sampled once (temperature 1)
    ppo_reward: str = option("", "ppo: the reward PPO maximises: '' for `reward` itself (PPO-GT, the ground truth), or "
                             "another spec, typically a reward model trained here (rm:out/rm/final); eval/reward "
                             "stays `reward`'s", identity=True)
    ppo_epochs: int = option(4, "ppo: passes over each rollout batch", identity=True)
    mini_batch_size: int = option(16, "ppo: rollouts per optimizer step, over all ranks (batch_size / mini_batch_size "
                                  "steps per pass)", identity=True)
    kl_coef: float = option(0.2, "ppo: the starting coefficient of the per-token KL penalty against the reference",
                            identity=True)
    target_kl: float = option(6.0, "ppo: the sequence KL the adaptive controller steers kl_coef towards (Ziegler "
                              "et al. 2019); 0 keeps kl_coef fixed", identity=True)
    kl_horizon: int = option(10000, "ppo: the adaptive controller's horizon, in rollouts", identity=True)
    gamma: float = option(1.0, "ppo: discount of GAE", identity=True)
    lam: float = option(0.95, "ppo: lambda of GAE", identity=True)
    cliprange: float = option(0.2, "ppo: clip of the policy ratio", identity=True)
    cliprange_value: float = option(0.2, "ppo: clip of the value update", identity=True)
    vf_coef: float = option(0.1, "ppo: weight of the value loss", identity=True)
    # --- optimisation
    optimizer: str = option("adamw", "adamw, or rmsprop (the DPO paper's, App. B: with lr 1e-6 and warmup_steps 150)",
                            identity=True)
    lr: float = option(5e-5, "peak learning rate", identity=True)
    weight_decay: float = option(0.0, "AdamW weight decay, applied to 2-D weights only", identity=True)
    adam_beta1: float = option(0.9, "AdamW beta1", identity=True)
    adam_beta2: float = option(0.999, "AdamW beta2", identity=True)
    warmup_steps: int = option(0, "linear warmup from 0 to lr over this many optimizer steps", identity=True)
    lr_schedule: str = option("constant", "after warmup: constant, or cosine decay reaching 0 at the end of the last epoch "
                             "(max_steps stops early without compressing it)", identity=True)
    batch_size: int = option(64, "pairs per optimizer step, over all ranks (independent of the world size)",
                             identity=True)
    micro_batch_size: int = option(8, "pairs per forward pass on one rank; the rest is gradient accumulation")
    epochs: int = option(1, "passes over the training pairs")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = run all epochs)")
    grad_clip: float = option(10.0, "clip the global gradient norm to this (0 = no clipping)", identity=True)
    max_bad_steps: int = option(0, "optimizer steps with a non-finite loss or gradient norm to skip before "
                                "stopping (0 = stop at the first)")
    # --- parallelism and precision
    precision: str = option("bf16", "bf16 (bf16 compute, fp32 master weights and grad reduction), fp16 "
                            "(same with dynamic loss scaling, for GPUs without bf16), or fp32", identity=True)
    reference_precision: str = option("same", "dtype of the frozen reference model: same (as precision), bf16, "
                                      "fp16 or fp32. bf16 under precision=fp32 halves the reference's memory and, "
                                      "where bf16 matmuls are fast (GPUs; CPUs with AMX), its forward time; its "
                                      "log-probs then carry bf16 rounding (about 0.05 nats per 24-token response "
                                      "at gpt2's shape), so the implicit rewards at step 0 are not exactly 0",
                                      identity=True)
    lm_head_precision: str = option("bf16_in_fp32_out", "under bf16/fp16, how the fp32 logits of the scored rows "
                                    "are computed: bf16_in_fp32_out (a bf16 GEMM writing fp32; the same products as "
                                    "fp32, ~15x its speed on an H100) or fp32 (an fp32 GEMM); see gpt2.scored_logits",
                                    identity=True)
    sharding: str = option("full", "full: FSDP over all ranks; hybrid: shard within a node, replicate across "
                           "nodes (HSDP); none: no FSDP (one process only)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward (saves memory)")
    compile: bool = option(False, "torch.compile each transformer block")
    group_order: bool = option(False, "order each epoch by prompt: shuffle the groups and keep each group's pairs "
                               "together, so pairs of one prompt share a packed row (prefix_sharing): 160 tokens "
                               "instead of 528 for an lm-human-preferences query's 3 pairs", identity=True)
    prefix_sharing: bool = option(True, "DPO: run each prompt once, as one packed row [prompt | chosen | rejected "
                                  "| ...] whose attention mask keeps the responses apart (same log-probs, fewer "
                                  "tokens: 112 instead of 176 for a pair at 64 + 24)")
    # --- evaluation, samples, logging, checkpoints
    eval_every: int = option(100, "evaluate on the held-out pairs every N steps (and at the end; 0 = end only)")
    kl_samples: int = option(16, "samples (temperature 1) from the held-out prompts, each prompt in turn, at each "
                             "eval: eval/kl, the sequence-level KL(policy || reference) summed over positions "
                             "(needs a live reference model), and eval/reward")
    eval_prompts: str = option("", "a prompt file (JSONL with a \"prompt\" per line, or .txt, one per line) whose "
                               "prompts are sampled for eval/reward, eval/kl and samples.md instead of the held-out "
                               "pairs' (the paper: prefixes of IMDb's test split); the held-out pairs still give "
                               "the preference metrics")
    n_samples: int = option(8, "held-out prompts in the before/after sample table (samples.md)")
    reward: str = option("", "ground-truth reward of samples, logged as eval/reward and shown in samples.md: "
                         + SPEC_HELP + ", or '' for none")
    max_new_tokens: int = option(24, "tokens sampled per continuation (samples and KL estimate)")
    temperature: float = option(0.7, "sampling temperature (0 = greedy)")
    log_every: int = option(10, "print a progress line and append to metrics.jsonl every N steps")
    ckpt_every: int = option(0, "save a sharded checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "complete checkpoints to keep; older ones are deleted")


CHOICES = {
    "device": ("auto", "cpu", "cuda"), "dataset": DATASETS, "objective": ("dpo", "sft", "unlikelihood", "reward_model", "ppo"),
    "loss_type": LOSS_TYPES,
    "logps": ("auto", "sum", "mean"), "sft_on": ("chosen", "all"), "lr_schedule": ("constant", "cosine"),
    "precision": ("bf16", "fp16", "fp32"), "append_eos": ("auto", "true", "false"), "hub_format": HUB_FORMATS,
    "reference_precision": ("same", "bf16", "fp16", "fp32"), "sharding": ("full", "hybrid", "none"),
    "lm_head_precision": HEAD_PRECISIONS, "optimizer": ("adamw", "rmsprop"),
}
MAX_SEED = 2**32 - 1  # numpy's and every generator's range; the seed also offsets per-eval sampling seeds
POSITIVE = ("n_layer", "n_head", "n_embd", "n_positions", "max_prompt_len", "max_len", "batch_size",
            "micro_batch_size", "epochs", "log_every", "max_new_tokens", "keep_checkpoints", "ppo_epochs",
            "mini_batch_size", "kl_horizon")
NON_NEGATIVE = ("kl_coef", "target_kl", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "unlikelihood_alpha",
                "sft_steps", "sft_lr", "max_records", "warmup_steps", "max_steps", "grad_clip", "max_bad_steps", "eval_every",
                "kl_samples", "n_samples", "ckpt_every", "lr", "weight_decay", "temperature")


def field_types():
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def coerce(key, value, source):
    """A YAML value or a command-line string, checked against the field's type."""
    kind = field_types()[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif isinstance(value, bool) and "true" in CHOICES.get(key, ()):  # YAML's `append_eos: true`
        return str(value).lower()
    raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {shortened(value)}")


def shortened(value, limit=80) -> str:
    """A value's repr for a message, cut to `limit` characters: a message never prints a value whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: a config has no use for them, and nested aliases expand a
    few hundred bytes into gigabytes (the 'billion laughs')."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a config file",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(path, what="config file"):
    """A config file's YAML (the trainer's, the frontier's), refused cheaply and in one line when it is
    missing, not a regular file, larger than 1 MiB, uses aliases, nests too deeply or is not YAML."""
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path!r}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r}: not a regular file")
    if os.path.getsize(path) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {os.path.getsize(path):,} bytes; a config file is at most {MAX_YAML_BYTES:,}")
    try:
        with open(path, encoding="utf-8") as f:
            loader = _NoAliasLoader(f)  # yaml.safe_load's loader, less the aliases
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({shortened(str(err), 300)})") from err
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def unknown_key_message(key, source):
    close = difflib.get_close_matches(key, list(field_types()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{source}: unknown key {key!r}{hint} (`python fsdp_train.py --help` lists every key)"


def validate(cfg: TrainConfig, prog="fsdp_train.py"):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for f in dataclasses.fields(TrainConfig):  # NaN passes every comparison below; inf is never meant
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            raise ConfigError(f"{f.name} must be a finite number, got {getattr(cfg, f.name)}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..{MAX_SEED}, got {cfg.seed}")
    if cfg.init_from == "scratch":
        check_positions(cfg, cfg.n_positions, "n_positions")
    # the rules that live with the code they protect, in the same words
    check_loss_settings(cfg.beta, cfg.loss_type, cfg.label_smoothing)
    check_eval_fraction(cfg.eval_fraction)
    check_lengths(cfg.max_prompt_len, cfg.max_len)
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size, world_size=1)  # again with the world size at start
    if cfg.init_from == "scratch":
        try:
            GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions)
        except ValueError as err:  # GPTConfig's own checks (n_embd divisible by n_head)
            raise ConfigError(str(err)) from err
    if cfg.dataset != "demo" and not cfg.data_path:
        raise ConfigError(f"dataset={cfg.dataset} needs data_path (the file to read)")
    if cfg.dataset in ("jsonl", "hh", "text") or (cfg.dataset == "lm_human_preferences" and
                                                          cfg.data_path not in ("sentiment", "descriptiveness")):
        if not os.path.exists(cfg.data_path):
            raise ConfigError(f"data_path {cfg.data_path!r}: no such file")
        if not os.path.isfile(cfg.data_path):
            raise ConfigError(f"data_path {cfg.data_path!r}: not a regular file (a directory, a FIFO, a device)")
    if cfg.reward:
        check_reward_spec(cfg.reward)
    if cfg.eval_prompts and not os.path.isfile(cfg.eval_prompts):
        raise ConfigError(f"eval_prompts {cfg.eval_prompts!r}: no such file")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:  # before any data is read or file written
        raise ConfigError("--wandb_log needs Weights & Biases: pip install wandb")
    check_objective(cfg, prog)
    if cfg.precompute_reference and cfg.reference_free:
        raise ConfigError("precompute_reference and reference_free exclude each other")
    check_sharding(cfg)


DESCRIPTIONS = {
    "fsdp_train.py": "DPO (and SFT, unlikelihood, a reward model) for GPT-2 with FSDP2. Launch with torchrun for "
                     "several processes: torchrun --nproc_per_node N fsdp_train.py --config_file config/X.yaml",
    "ppo_train.py": "PPO for GPT-2 with FSDP2, on a ground-truth reward or a reward model (ppo_reward: rm:DIR). Launch "
                    "with torchrun for several processes: torchrun --nproc_per_node N ppo_train.py --config_file X.yaml",
}


def parse_args(argv=None, prog="fsdp_train.py") -> TrainConfig:
    """--config_file PATH, then --key=value overrides, then validation. prog: the command (ppo_train.py
    trains objective ppo: a config file's objective is taken as ppo there, a flag's is checked)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTIONS[prog],
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config_file", help="YAML file of keys below; flags given after it override it")
    defaults = TrainConfig(**program_defaults(prog))
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})"
        if f.type is bool:  # --flag alone means true; --flag=false also works
            parser.add_argument(f"--{f.name}", nargs="?", const="true", metavar="BOOL", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", metavar=f.type.__name__.upper(), help=help_text)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        key = unknown[0].lstrip("-").split("=")[0]
        raise ConfigError(unknown_key_message(key, f"command line ({unknown[0]})"))
    values = {}
    config_file = vars(args).pop("config_file", None)
    if config_file is not None:
        loaded = read_yaml(config_file, "--config_file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of key: value, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in field_types():
                raise ConfigError(unknown_key_message(key, config_file))
            values[key] = coerce(key, value, config_file)
    if prog == "ppo_train.py":  # a DPO config file serves PPO too: its objective is PPO's here
        values.pop("objective", None)
    for key, value in vars(args).items():
        values[key] = coerce(key, value, f"--{key}")
    cfg = TrainConfig(**(program_defaults(prog) | values))
    validate(cfg, prog)
    return cfg


def program_defaults(prog) -> dict:
    return {"objective": "ppo"} if prog == "ppo_train.py" else {}


def check_objective(cfg: TrainConfig, prog):
    """Which command trains which objective, and what each needs."""
    if (cfg.objective == "ppo") != (prog == "ppo_train.py"):
        raise ConfigError(f"objective={cfg.objective} is trained by "
                          f"{'ppo_train.py' if cfg.objective == 'ppo' else 'fsdp_train.py'}, not {prog}")
    if cfg.dataset == "text" and cfg.objective != "sft":
        raise ConfigError(f"dataset=text is plain text, without prompts or preferences: only objective=sft trains on "
                          f"it (the paper's SFT stage); objective={cfg.objective} reads preference pairs")
    if cfg.ppo_reward:
        check_reward_spec(cfg.ppo_reward)
    if cfg.objective == "ppo":
        if not (cfg.ppo_reward or cfg.reward):
            raise ConfigError("objective=ppo needs a reward to optimise: ppo_reward or reward=" + SPEC_HELP)
        check_batch_sizes(cfg.mini_batch_size, cfg.micro_batch_size, world_size=1, name="mini_batch_size")
        if cfg.batch_size % cfg.mini_batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size} (rollouts per batch) is not a multiple of "
                              f"mini_batch_size={cfg.mini_batch_size}")


def check_positions(cfg: TrainConfig, n_positions: int, source: str):
    """Every sequence the run builds fits the model's positions: a training row (max_len tokens) and
    a sampled one (the prompt, then max_new_tokens). `source` says where n_positions comes from."""
    if cfg.max_len > n_positions:
        raise ConfigError(f"max_len={cfg.max_len} is longer than the model's {n_positions} positions ({source}); "
                          f"set max_len <= {n_positions}")
    sampled = cfg.max_prompt_len + cfg.max_new_tokens
    if (cfg.n_samples or cfg.kl_samples) and sampled > n_positions:
        raise ConfigError(f"max_prompt_len + max_new_tokens = {sampled} is longer than the model's {n_positions} "
                          f"positions ({source}); samples and the KL estimate would not fit")


def check_sharding(cfg: TrainConfig, world_size: int = 1):
    """sharding=none is a plain module: one process, fp32 (mixed precision is FSDP's policy). Checked
    by validate() and again by parallel.setup_distributed, which knows the world size (and is what
    the benchmarks call)."""
    if cfg.sharding == "none" and world_size > 1:
        raise ConfigError(f"sharding=none runs without FSDP and needs one process, got world size {world_size}")
    if cfg.sharding == "none" and cfg.precision != "fp32":
        raise ConfigError(f"sharding=none trains in fp32 only: mixed precision ({cfg.precision}) comes from FSDP's "
                          "MixedPrecisionPolicy. Use sharding=full, which also runs as one process")


def data_options(cfg: TrainConfig) -> dict:
    """The loader's keyword arguments for this config (load_preferences', or load_texts' for text)."""
    options = {"append_eos": None if cfg.append_eos == "auto" else cfg.append_eos == "true"}
    if cfg.dataset in ("lm_human_preferences", "text"):
        options["max_records"] = cfg.max_records or None
    if cfg.dataset == "hub":
        options |= {"split": cfg.split, "revision": cfg.data_revision or None, "hub_format": cfg.hub_format}
    return options


def logps_average(cfg: TrainConfig) -> bool:
    """Length-averaged sequence log-probs (IPO's) rather than summed ones (DPO's)."""
    return cfg.logps == "mean" or (cfg.logps == "auto" and cfg.loss_type == "ipo")


def shares_prompt(cfg: TrainConfig) -> bool:
    """Whether batches are packed by prompt (PackedBatch): DPO with prefix_sharing; SFT reads only
    the chosen rows of a PairBatch, and a reward model reads each row's last token."""
    return cfg.prefix_sharing and cfg.objective == "dpo"


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def reference_precision_name(cfg: TrainConfig) -> str:
    """The reference model's precision, "same" resolved: "fp32" under precision=fp32 either way."""
    return cfg.precision if cfg.reference_precision == "same" else cfg.reference_precision


PPO_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["help"].startswith("ppo:"))


def run_identity_keys() -> tuple:
    """The fields that fix a run's trajectory (declared with identity=True). The data's file, format and
    length settings are not: the data fingerprint covers them, so the same tokens from a moved file still
    resume. Nor are epochs and max_steps: raising them extends a finished run (README, 'Resume')."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["identity"])
