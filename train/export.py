"""The export, out_dir/final/: a complete Hugging Face model folder that transformers, the hub and
people can use without this project.

gpt2.py's write_hf_checkpoint writes the weights (model.safetensors) and config.json; this adds
- GPT-2's tokenizer: vocab.json and merges.txt (data/gpt2_bpe/'s encoder.json and vocab.bpe, byte
  for byte), tokenizer_config.json and special_tokens_map.json, so AutoTokenizer gives GPT-2's;
- generation_config.json: <|endoftext|> as eos, bos and pad, and the run's sampling settings;
- README.md, the model card: base model, data, objective, steps, precision, the final held-out
  metrics, the command that trained it and every setting.
Publishing is the hub's CLI: `hf upload <user>/<repo> out_dir/final` (README, "The export").
"""
import json
import os
import shlex
import shutil

from data.tokenizer import EOT_ID, read_bpe_file
from gpt2 import PRESETS, write_hf_checkpoint
from train.config import TrainConfig, dump_config, reference_precision_name
from train.run_dir import write_atomic

EOT = "<|endoftext|>"


def write_export(final, step, config, state_dict, cfg: TrainConfig, final_metrics: dict, counts: dict,
                 command: str):
    """Rank 0: the whole folder, complete or not at all. It is written as final.tmp/ and renamed into
    place (the previous final/ moved aside first, then removed), with export.json recording the step
    of its weights: a relaunch finds either a complete export of a known step or none."""
    tmp, old = final + ".tmp", final + ".old"
    for leftover in (tmp, old):  # from a crash during an earlier export
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    write_hf_checkpoint(config, state_dict, tmp)
    write_tokenizer_files(tmp, model_max_length=config.n_positions)
    write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg))
    write_atomic(os.path.join(tmp, "README.md"), model_card(cfg, final_metrics, counts, command))
    write_json(os.path.join(tmp, EXPORT_RECORD), {"step": step})
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.isdir(old):
        shutil.rmtree(old)


EXPORT_RECORD = "export.json"  # {"step": N}: the optimizer step whose weights final/ holds


def exported_step(final) -> int | None:
    """The step of the complete export in `final`, or None (no export, or one a crash cut short)."""
    try:
        with open(os.path.join(final, EXPORT_RECORD)) as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):  # missing, damaged: there is no complete export
        return None
    return step if isinstance(step, int) else None


def write_json(path, value):
    write_atomic(path, json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------- tokenizer and generation

def write_tokenizer_files(final, model_max_length: int):
    """GPT-2's tokenizer as the hub's openai-community/gpt2 ships it (vocab.json, merges.txt) with the
    two JSON files transformers (4.x) writes for it; transformers 4 and 5 both read them."""
    write_atomic(os.path.join(final, "vocab.json"), read_bpe_file("encoder.json"))
    write_atomic(os.path.join(final, "merges.txt"), read_bpe_file("vocab.bpe"))
    write_json(os.path.join(final, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False,
                                               "single_word": False, "special": True}},
        "bos_token": EOT,
        # decode must give the text back exactly, as tiktoken does (no " ." -> "." clean-up)
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOT,
    })
    write_json(os.path.join(final, "special_tokens_map.json"), {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})


def generation_config(cfg: TrainConfig) -> dict:
    """What `generate` and pipelines use by default: the run's sample settings. <|endoftext|> is also
    the pad id, as GPT-2 users set it (GPT-2 has no pad token)."""
    config = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
              "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.temperature > 0}
    if cfg.temperature > 0:
        # plain temperature sampling, as the run's samples; top_k 0 switches off transformers 4's default of 50
        config |= {"temperature": cfg.temperature, "top_k": 0}
    return config


# ----------------------------------------------------------------------------- the model card

def base_model(init_from: str) -> str | None:
    """The hub id of the starting weights, for the card's metadata; None for scratch or a local directory."""
    if init_from in PRESETS:
        return f"openai-community/{init_from}"
    if init_from == "scratch" or os.path.isdir(init_from):
        return None
    return init_from


def model_card(cfg: TrainConfig, final_metrics: dict, counts: dict, command: str) -> str:
    base = base_model(cfg.init_from)
    reward_model = cfg.objective == "reward_model"
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-classification' if reward_model else 'text-generation'}", "tags: [gpt2, dpo]"]
    front += [f"base_model: {base}"] if base else []
    started = (f"[{base}](https://huggingface.co/{base})" if base else
               f"a random initialisation ({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd})"
               if cfg.init_from == "scratch" else f"the local weights `{cfg.init_from}`")
    objective = OBJECTIVE_NAMES.get(cfg.objective,
                                    "Direct Preference Optimization ([Rafailov et al. 2023](https://arxiv.org/abs/2305.18290))")
    rows = [("base model", started), ("data", data_row(cfg, counts)), ("objective", objective_row(cfg)),
            ("steps", steps_row(cfg, final_metrics)),
            ("precision", f"{cfg.precision} (reference model: {reference_precision_name(cfg)})"),
            ("command", f"`{command}`")]
    lines = front + ["---", "", "# GPT-2 trained with gpt2-dpo", "",
                     f"Trained from {started} with {objective}, by gpt2-dpo, a from-scratch DPO trainer for GPT-2 in "
                     "plain PyTorch. The folder is a transformers model "
                     f"(`{'GPT2ForSequenceClassification' if reward_model else 'GPT2LMHeadModel'}`) with GPT-2's "
                     "tokenizer.", "", "## Use", ""] + (REWARD_MODEL_USE if reward_model else [
                     "```python", "from transformers import pipeline", "",
                     'generate = pipeline("text-generation", model="PATH_OR_REPO_ID")',
                     'print(generate("Honestly, the hotel was")[0]["generated_text"])', "```", "",
                     "`generation_config.json` holds the run's sampling settings "
                     f"({sampling(cfg)}, {cfg.max_new_tokens} new tokens)."]) + [
                     "", "## Training", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {table_cell(value)} |" for name, value in rows]
    lines += ["", "## Held-out metrics at the end of training", ""] + metrics_table(final_metrics)
    lines += ["", "<details><summary>Every setting of the run (config.yaml)</summary>", "", "```yaml",
              dump_config(cfg).rstrip(), "```", "", "</details>", "",
              "## Licence", "", "The tokenizer files (vocab.json, merges.txt) are OpenAI's GPT-2 byte-pair encoding, "
              "under OpenAI's modified MIT licence."
              + (f" The weights derive from {base}; see its licence." if base else ""), ""]
    return "\n".join(lines)


OBJECTIVE_NAMES = {
    "sft": "supervised fine-tuning on the chosen responses (`objective: sft`)",
    "unlikelihood": "unlikelihood training (`objective: unlikelihood`, the DPO paper's baseline)",
    "reward_model": "a Bradley-Terry reward model of the preference pairs (`objective: reward_model`)",
    "ppo": "PPO against a reward, with a KL penalty towards the starting model (`ppo_train.py`)",
}
REWARD_MODEL_USE = [
    "```python", "import torch", "from transformers import AutoTokenizer, GPT2ForSequenceClassification", "",
    'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")',
    'model = GPT2ForSequenceClassification.from_pretrained("PATH_OR_REPO_ID")',
    'ids = tokenizer("Honestly, the hotel was lovely", return_tensors="pt").input_ids',
    "print(model(ids).logits[0, 0])  # the reward: higher is preferred", "```", "",
    "The score is read at the last token that is not `<|endoftext|>` (the pad token), as in training; gpt2-dpo "
    "uses the folder as a reward with `reward: rm:PATH`."]


def table_cell(text: str) -> str:
    return text.replace("|", r"\|")  # a bare | (in a path or an argument) would end the cell


def sampling(cfg: TrainConfig) -> str:
    return f"temperature {cfg.temperature}" if cfg.temperature > 0 else "greedy"


def data_row(cfg: TrainConfig, counts: dict) -> str:
    source = ("the project's generated demo set (data/demo.py)" if cfg.dataset == "demo"
              else f"`{cfg.data_path}`" + (f" (split {cfg.split})" if cfg.dataset == "hub" else ""))
    if cfg.dataset == "text":
        return (f"format `text`, {source}: {counts.get('texts', 0):,} texts, {counts.get('train_prompts', 0):,} for "
                f"training and {counts.get('eval_prompts', 0):,} held out (eval_fraction {cfg.eval_fraction}); each "
                f"after <|endoftext|>, cut to {cfg.max_len} tokens ({counts.get('cut', 0):,} were cut)")
    pairs = counts.get("train_pairs", 0) + counts.get("eval_pairs", 0)
    return (f"format `{cfg.dataset}`, {source}: {pairs:,} preference pairs, {counts.get('train_pairs', 0):,} for "
            f"training and {counts.get('eval_pairs', 0):,} held out ({counts.get('eval_prompts', 0):,} prompts, "
            f"eval_fraction {cfg.eval_fraction} of the prompts); prompts cut to {cfg.max_prompt_len} tokens, "
            f"prompt + response to {cfg.max_len}")


def objective_row(cfg: TrainConfig) -> str:
    if cfg.objective == "reward_model":
        return "reward_model: -log sigmoid(r(x, chosen) - r(x, rejected)), r read at the last response token"
    if cfg.objective == "ppo":
        return (f"ppo on reward `{cfg.ppo_reward or cfg.reward}`: KL coefficient {cfg.kl_coef}"
                + (f" adapted towards a KL of {cfg.target_kl}" if cfg.target_kl else " (fixed)")
                + f", {cfg.ppo_epochs} epochs of mini-batches of {cfg.mini_batch_size} per rollout batch, "
                  f"GAE gamma {cfg.gamma} lambda {cfg.lam}, clip {cfg.cliprange}, value clip {cfg.cliprange_value}, "
                  f"value-loss weight {cfg.vf_coef}")
    if cfg.objective == "sft":
        return "sft (maximum likelihood of " + ("plain text)" if cfg.dataset == "text" else
                                               "every distinct response)" if cfg.sft_on == "all" else
                                               "the chosen responses)")
    if cfg.objective == "unlikelihood":
        return (f"unlikelihood: maximum likelihood of the chosen responses and the unlikelihood of the rejected "
                f"ones' tokens, α = {cfg.unlikelihood_alpha}")
    row = (f"dpo, loss_type {cfg.loss_type}, β = {cfg.beta}, label_smoothing {cfg.label_smoothing}, "
           f"reference_free {str(cfg.reference_free).lower()}, sequence log-probs: {cfg.logps}")
    if cfg.sft_steps:
        row += f"; after an SFT warm start of {cfg.sft_steps} steps (lr {cfg.sft_lr or cfg.lr})"
    return row


OPTIMIZER_NAMES = {"adamw": "AdamW", "rmsprop": "RMSprop"}


def steps_row(cfg: TrainConfig, final_metrics: dict) -> str:
    steps = final_metrics.get("step", "?")
    what, items = (("PPO steps", "rollouts") if cfg.objective == "ppo" else
                   ("optimizer steps", "texts" if cfg.dataset == "text" else "pairs"))
    return (f"{steps} {what} of {cfg.batch_size} {items} (micro-batch {cfg.micro_batch_size} per rank, "
            f"epochs {cfg.epochs}); {OPTIMIZER_NAMES[cfg.optimizer]} lr {cfg.lr}, {cfg.lr_schedule} after "
            f"{cfg.warmup_steps} warmup steps, "
            f"weight decay {cfg.weight_decay}, gradient clipping {cfg.grad_clip}, seed {cfg.seed}")


def metrics_table(final_metrics: dict) -> list[str]:
    values = {k: v for k, v in final_metrics.items() if k.startswith("eval/") and k != "eval/seconds"}
    if not values:
        return ["No held-out prompts (eval_fraction 0): no held-out metrics."]
    note = f"At step {final_metrics.get('step', '?')}, on the held-out prompts."
    if "eval/kl" in values:
        note += " `eval/kl` estimates KL(policy ‖ reference) from continuations sampled from the policy."
    return ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in values.items()] + ["", note]


def training_command(argv, prog="fsdp_train.py") -> str:
    """The command line as python or torchrun ran it (torchrun's own options are read back from the
    environment it gives its workers)."""
    args = shlex.join([prog, *argv])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python {args}"
    return (f"torchrun --nnodes {os.environ.get('GROUP_WORLD_SIZE', '?')} "
            f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')} {args}")
