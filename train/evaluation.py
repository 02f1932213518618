"""Running a model over data without training it: held-out evaluation with the KL estimate, the
before/after samples, and the reference's log-probs of every pair (precompute_reference). Used by
fsdp_train.py; every function here is collective under FSDP (all ranks call it with the same
arguments)."""
import json
import math
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data.batches import collate, left_pad, sft_pairs
from data.records import read_prompts
from data.tokenizer import EOT_ID, decode, encode
from dpo import PairLogps, bradley_terry, chosen_logps, concatenated_logps, dpo_loss, sequence_scores, span_kl
from train.config import logps_average, shares_prompt
from train.rank0 import on_rank0
from train.checkpoint import file_fingerprint
from train.run_dir import reference_cache_file, write_atomic


def map_pairs(pairs, fn, cfg, rank, world, device):
    """fn(batch) -> (B, k) tensor, over all pairs split across ranks; (len(pairs), k) on every rank
    in the original order. Every rank runs the same number of forward passes (FSDP needs that):
    short ranks repeat pair 0 and drop the result."""
    per_rank = math.ceil(len(pairs) / world)
    indices = list(range(rank * per_rank, min(len(pairs), (rank + 1) * per_rank)))
    indices += [0] * (per_rank - len(indices))
    outputs = []
    for start in range(0, per_rank, cfg.micro_batch_size):
        chunk = indices[start:start + cfg.micro_batch_size]
        batch = collate([pairs[i] for i in chunk], shares_prompt(cfg)).to(device)
        outputs.append(fn(batch).float())
    local = torch.cat(outputs)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return torch.cat(gathered)[:len(pairs)]


PAIR_LOGPS_COLUMNS = 6  # chosen, rejected (summed log-probs), their token counts, their logit sums


def pair_logps(model):
    """batch -> (B, 6) PairLogps columns, computed without autograd (see as_pair_logps)."""
    @torch.no_grad()
    def columns(batch):
        logps = concatenated_logps(model, batch)
        return torch.stack([logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens,
                            logps.chosen_logits, logps.rejected_logits], dim=-1)
    return columns


def as_pair_logps(columns) -> PairLogps:
    return PairLogps(*columns.unbind(-1))


@torch.no_grad()
def sample(model, prompts, cfg, device, seed, temperature, uniforms=None):
    """Continuations of prompts (identical on every rank: same inputs, same seed) -> (tokens, masks).
    uniforms: the sampler's (len(prompts), max_new_tokens) draws, instead of a generator's from seed."""
    input_ids, mask = (t.to(device) for t in left_pad(prompts))
    generator = torch.Generator(device=device).manual_seed(seed) if uniforms is None else None
    # Decoding runs eagerly under `compile`: its prefill and one-token steps would each compile the
    # blocks again, for a few hundred small forwards per eval, and use up their recompile budget.
    with torch.compiler.set_stance("force_eager"):
        tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                temperature=temperature, generator=generator, stop_early=False, uniforms=uniforms)
    new = tokens[:, input_ids.size(1):]
    after_eos = (new == EOT_ID).long().cumsum(-1) - (new == EOT_ID).long() > 0  # tokens after the first EOT
    response_mask = torch.cat([torch.zeros_like(mask), ~after_eos], dim=1)
    return tokens, torch.cat([mask, ~after_eos], dim=1), response_mask


@torch.no_grad()
def evaluate(policy, reference, eval_pairs, reference_eval_logps, cfg, rank, world, device):
    if cfg.objective == "reward_model":
        return evaluate_reward_model(policy, eval_pairs, cfg, rank, world, device)
    policy.eval()
    metrics = {}
    if eval_pairs and cfg.dataset != "text":  # held-out texts hold no preference to measure, only their likelihood
        policy_logps = as_pair_logps(map_pairs(eval_pairs, pair_logps(policy), cfg, rank, world, device))
        if cfg.objective != "dpo" or cfg.reference_free:
            reference_logps = None
        elif reference_eval_logps is not None:  # (N, 2) summed, precomputed
            reference_logps = reference_eval_logps.unbind(-1)
        else:
            reference_logps = as_pair_logps(map_pairs(eval_pairs, pair_logps(reference), cfg, rank, world, device))
            reference_logps = reference_logps.chosen, reference_logps.rejected
        sft = cfg.objective != "dpo"  # sft and unlikelihood: the preference metrics of the policy alone
        _, metrics = dpo_loss(policy_logps, *(reference_logps or (None, None)), beta=cfg.beta,
                              loss_type="sigmoid" if sft else cfg.loss_type,
                              label_smoothing=0.0 if sft else cfg.label_smoothing,
                              reference_free=reference_logps is None, average=logps_average(cfg))
    if cfg.objective != "dpo":  # the preference loss above is not what these train: not "loss"
        metrics.pop("loss", None)
    if eval_pairs and cfg.objective == "sft":
        metrics["loss"] = sft_eval_loss(policy, eval_pairs, cfg, rank, world, device)
    prompts = eval_sample_prompts(cfg, eval_pairs, cfg.kl_samples)
    if prompts and (reference is not None or cfg.reward):
        metrics |= sampled_metrics(policy, reference, prompts, cfg, device)
    policy.train()
    return {f"eval/{k}": v for k, v in metrics.items()}


def sft_eval_loss(model, eval_pairs, cfg, rank, world, device):
    """What SFT trains, held out: the NLL per token of the responses it reads (the chosen ones, or with
    sft_on: all every distinct one; each text, with dataset: text), running only those rows."""
    rows = sft_pairs(eval_pairs) if cfg.sft_on == "all" else eval_pairs
    sums = map_pairs(rows, lambda batch: torch.stack(chosen_logps(model, batch), dim=-1), cfg, rank, world, device)
    return -sums[:, 0].sum() / sums[:, 1].sum()  # (N, 2) fp32: summed log-probs, token counts


def evaluate_reward_model(model, eval_pairs, cfg, rank, world, device):
    """The reward model on the held-out pairs: loss, accuracy (the chosen response scored above the
    rejected one: against the ground-truth ordering, for pairs ranked by a ground-truth reward), margin."""
    if not eval_pairs:
        return {}
    model.eval()
    scores = map_pairs(eval_pairs, lambda batch: torch.stack(sequence_scores(model, batch.input_ids).chunk(2), dim=-1),
                       cfg, rank, world, device)  # (N, 2)
    model.train()
    _, metrics = bradley_terry(*scores.unbind(-1))
    return {f"eval/{k}": v for k, v in metrics.items()}


def sampled_metrics(policy, reference, prompts, cfg, device):
    """The paper's two axes (DPO Fig. 2), from one sample per prompt row drawn from the policy itself
    (temperature 1, max_new_tokens long), with a live reference:
      kl             the sequence-level KL(policy || reference) as the paper plots it (its footnote 3):
                     at each position of a sample, the full KL between the two next-token
                     distributions, summed along the sample (to its first <|endoftext|>), averaged
                     over the samples. Never negative.
      kl_one_sample  the mean of log policy(y|x) - log reference(y|x) over the same samples: the same
                     KL in expectation, estimated from the sampled tokens alone (far noisier).
    and with cfg.reward, reward: the mean ground-truth reward of the same samples. Every eval draws
    with the same seed (common random numbers): what changes between two evals is the policy, not
    the sampler's luck, so a run's curve is far smoother than its per-eval standard error suggests."""
    tokens, attention_mask, response_mask = sample(policy, prompts, cfg, device, seed=cfg.seed, temperature=1.0)
    metrics = {}
    if reference is not None:
        start = tokens.size(1) - cfg.max_new_tokens  # every prompt ends at column start - 1 (left-padded)
        kl, log_ratio = span_kl(policy, reference, tokens, start, attention_mask, response_mask)
        metrics["kl"], metrics["kl_one_sample"] = kl.mean(), log_ratio.mean()
    if cfg.reward:
        rewards = reward_of(cfg, prompts, continuations_of(tokens, response_mask), device)
        metrics["reward"] = torch.tensor(sum(rewards) / len(rewards), device=device)
    return metrics


def continuations_of(tokens, response_mask):
    """Sampled continuations as text, each cut at its first <|endoftext|>."""
    return [decode(row[m].tolist()).split("<|endoftext|>")[0] for row, m in zip(tokens.cpu(), response_mask.cpu())]


# spec -> loaded reward model: rank 0 holds those of the evals, every rank those of its PPO rollouts
# (loading a classifier takes seconds)
_reward_models = {}


def reward_of(cfg, prompts, continuations, device) -> list[float]:
    """Collective: the ground-truth reward (cfg.reward) of each continuation, scored on rank 0."""
    return on_rank0(score_texts, device, f"score samples with reward={cfg.reward}", cfg.reward,
                    [decode(p) for p in prompts], continuations, str(device))


def score_texts(spec, prompts, continuations, device):
    """This process's reward model of `spec` (loaded once), scoring continuations of the prompts."""
    from train.reward import load_reward  # transformers or vaderSentiment: optional extras, loaded on first use
    if spec not in _reward_models:
        _reward_models[spec] = load_reward(spec, device=device)
    return [float(score) for score in _reward_models[spec].score(prompts, continuations)]


def eval_sample_prompts(cfg, pairs, n):
    """n prompt rows for the sampled metrics: the eval prompts (eval_prompts' file, else the held-out
    pairs') in turn, each repeated when there are fewer than n of them (more samples per prompt, a
    smaller standard error); none without any."""
    prompts = eval_prompt_set(cfg)[:n] if cfg.eval_prompts else distinct_prompts(pairs, n)
    return [prompts[i % len(prompts)] for i in range(n)] if prompts else []


_eval_prompt_sets = {}  # (path, max_prompt_len) -> token lists, read once per process


def eval_prompt_set(cfg) -> list[list[int]]:
    """eval_prompts' prompts as tokens, each cut to its last max_prompt_len (as the training prompts).
    The trainer reads it before any work (load_data), so a bad file stops the run there."""
    key = (cfg.eval_prompts, cfg.max_prompt_len)
    if key not in _eval_prompt_sets:
        _eval_prompt_sets[key] = [encode(p)[-cfg.max_prompt_len:] for p in read_prompts(cfg.eval_prompts)]
    return _eval_prompt_sets[key]


def distinct_prompts(pairs, n):
    """The prompts of the first n distinct groups (a group's pairs share one prompt)."""
    seen, prompts = set(), []
    for pair in pairs:
        if pair.group_index not in seen and len(prompts) < n:
            seen.add(pair.group_index)
            prompts.append(pair.prompt)
    return prompts


def sample_texts(model, prompts, cfg, device):
    """(continuations, their rewards or None): the before/after table's samples at cfg.temperature."""
    model.eval()
    tokens, _, response_mask = sample(model, prompts, cfg, device, seed=cfg.seed, temperature=cfg.temperature)
    model.train()
    texts = continuations_of(tokens, response_mask)
    return texts, (reward_of(cfg, prompts, texts, device) if cfg.reward else None)


# ----------------------------------------------------------------------------- the reference's log-probs, once

def precompute_reference_logps(reference, train_pairs, eval_pairs, cfg, rank, world, device, identity):
    """Reference log-probs of every pair ((N, 2) chosen, rejected, summed over tokens), cached in
    out_dir/reference_logps.safetensors. The cache is reused only when its key, the run identity
    (which holds the fingerprints of the data and of the starting weights), matches, and its bytes
    still have the sha256 recorded with the key: a damaged or edited cache is recomputed."""
    path = reference_cache_file(cfg.out_dir)
    fingerprint = json.dumps(identity, sort_keys=True)
    log = print if rank == 0 else (lambda *a: None)
    if on_rank0(cache_matches, device, f"read {path}.json", path, fingerprint, log):  # rank 0 decides for all
        cached = load_file(path, device=str(device))
        return cached["train"], cached["eval"]
    train = map_pairs(train_pairs, pair_logps(reference), cfg, rank, world, device)[:, :2].contiguous()  # (N, 2) summed
    evals = (map_pairs(eval_pairs, pair_logps(reference), cfg, rank, world, device)[:, :2].contiguous() if eval_pairs
             else torch.zeros(0, 2, device=device))
    on_rank0(write_reference_cache, device, f"write {path}", path, train, evals, fingerprint)
    return train, evals


def cache_matches(path, fingerprint, log=print) -> bool:
    if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
        return False
    with open(path + ".json") as f:
        try:
            key = json.load(f)
        except ValueError:
            key = None
    if not isinstance(key, dict) or key.get("identity") != fingerprint:
        return False
    if key.get("size_and_sha256") != file_fingerprint(path):
        log(f"{path}: its bytes do not have the sha256 recorded in {path}.json (damaged or edited); recomputing")
        return False
    return True


def write_reference_cache(path, train, evals, fingerprint):
    write_atomic(path, lambda tmp: save_file({"train": train.cpu(), "eval": evals.cpu()}, tmp))
    write_atomic(path + ".json", json.dumps({"identity": fingerprint, "size_and_sha256": file_fingerprint(path)}))
