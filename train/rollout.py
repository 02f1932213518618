"""PPO's rollouts: which prompts make step N, their continuations sampled from the policy with the KV
cache, each continuation's score from the reward, and the policy's, the value head's and the
reference's view of every sampled token. ppo_train.py runs it before each step's updates
(ppo_step.py). Every function here is collective under FSDP.

No rank ever waits for another in a collective: generation always runs max_new_tokens decode steps
(stop_early=False), however early a rank's own rows end, so every rank runs the same number of
forward passes, and every later forward has the same count on every rank (the FSDP + generate hang
of the DPO authors' repository, issue #85, cannot happen here). The sampler's uniform draws are one
table per step, (batch_size, max_new_tokens) from (seed, step), each row of the global batch its
own: a rollout does not depend on how many ranks drew it, nor on the micro-batches they drew it in.
Each rank scores its own rows; if the reward fails on one rank, every rank raises, the others naming
that rank and its error (train/rank0.on_every_rank), instead of waiting in the next forward's
all-gather (NCCL: until the process group's timeout, unless a launcher kills them first).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.batches import epoch_order, left_pad, rank_slice, step_batch
from dpo import padded_model_inputs, token_logps
from ppo import entropy_of
from data.tokenizer import decode
from train.evaluation import continuations_of, sample, score_texts
from train.rank0 import on_every_rank


@dataclass
class Rollout:
    """B sampled continuations (the global batch, on every rank) and what PPO needs of them."""
    prompt_indices: list[int]  # into the training prompts
    prompts: list[list[int]]
    responses: torch.Tensor  # (B, N) long: N = max_new_tokens sampled tokens (after the first EOT: EOT)
    mask: torch.Tensor  # (B, N) bool: each row up to and including its first <|endoftext|>
    scores: torch.Tensor  # (B,) the reward of each continuation, as the reward gives it
    logps: torch.Tensor  # (B, N) fp32 log-probs of the sampled tokens under the policy that drew them
    ref_logps: torch.Tensor  # (B, N) fp32, under the frozen reference
    values: torch.Tensor  # (B, N) fp32 value head, at the position that predicts each token


def rollout_prompts(step, n_prompts, cfg) -> list[int]:
    """The global batch of PPO step `step`: batch_size prompt indices, a pure function of seed, epoch
    and position (an epoch is one pass over the training prompts)."""
    return step_batch(step, n_prompts, cfg.batch_size, lambda epoch: epoch_order(n_prompts, cfg.seed, epoch))[1]


def rollout_uniforms(seed, step, n_rows, n_tokens):
    """The sampler's draws of step `step`'s rollout, (n_rows, n_tokens) in [0, 1): a pure function of
    seed and step, made on the CPU (the same numbers on any device)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return torch.rand(n_rows, n_tokens, generator=generator)


@torch.no_grad()
def make_rollout(policy, reference, train_prompts, step, cfg, rank, world, device) -> Rollout:
    """Step `step`'s rollout: this rank samples, scores and evaluates its slice of the global batch in
    chunks of micro_batch_size rows; the slices are then gathered, so that every rank holds the whole
    batch (a few tensors of B x max_new_tokens) and the updates can cut it into mini-batches as one
    process would."""
    indices = rollout_prompts(step, len(train_prompts), cfg)
    local = rank_slice(list(range(len(indices))), rank, world)
    uniforms = rollout_uniforms(cfg.seed, step, len(indices), cfg.max_new_tokens)
    parts = []
    policy.eval()
    for start in range(0, len(local), cfg.micro_batch_size):
        rows = local[start:start + cfg.micro_batch_size]
        prompts = [train_prompts[indices[i]] for i in rows]
        parts.append(rollout_chunk(policy, reference, prompts, uniforms[rows].to(device), cfg, device))
    policy.train()
    local_tensors = [torch.cat(column) for column in zip(*parts)]
    responses, mask, scores, logps, ref_logps, values = (all_gather_rows(t, world) for t in local_tensors)
    return Rollout(indices, [train_prompts[i] for i in indices], responses, mask.bool(), scores, logps, ref_logps,
                   values)


def rollout_chunk(policy, reference, prompts, uniforms, cfg, device):
    """One chunk: sample (temperature 1, max_new_tokens), score with the reward PPO maximises
    (ppo_reward, else reward), and run the policy (with its value head) and the reference over what
    was sampled."""
    tokens, _, response_mask = sample(policy, prompts, cfg, device, seed=None, temperature=1.0, uniforms=uniforms)
    start = tokens.size(1) - cfg.max_new_tokens
    responses, mask = tokens[:, start:], response_mask[:, start:]
    texts, reward = continuations_of(tokens, response_mask), cfg.ppo_reward or cfg.reward
    # each rank scores its own rows; one that fails stops every rank (not a wait in the next forward)
    scores = torch.tensor(on_every_rank(score_texts, device, f"score its rollouts with {reward}", reward,
                                        [decode(p) for p in prompts], texts, str(device)), device=device)
    logps, values, _ = response_forward(policy, prompts, responses, head="both")
    ref_logps, _, _ = response_forward(reference, prompts, responses, head="lm")
    return responses, mask.to(torch.uint8), scores, logps, ref_logps, values


def response_forward(model, prompts, responses, head, with_entropy=False):
    """One forward over left-padded prompts and their (B, N) responses -> (log-probs of the response
    tokens (B, N) fp32, the value head at the positions predicting them (B, N) fp32 with head="both"
    else None, with_entropy: the next-token entropy there (B, N), detached, else None). Only the N
    predicting positions of each row run the LM head (logits_at)."""
    device = responses.device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts))
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(responses, dtype=torch.bool)], dim=1)
    (B, T), N = input_ids.shape, responses.size(1)
    predictors = (torch.arange(B, device=device)[:, None] * T + torch.arange(T - N - 1, T - 1, device=device)).flatten()
    out = model(input_ids, logits_at=predictors, head=head, **padded_model_inputs(attention_mask))
    logits, values = out if head == "both" else (out, None)
    logps = token_logps(logits, responses.flatten()).view(B, N)
    entropy = entropy_of(logits).view(B, N) if with_entropy else None
    return logps, None if values is None else values.view(B, N), entropy


def all_gather_rows(local, world):
    """(b, ...) on each rank -> (world * b, ...) in rank order, on every rank (every rank's b is equal)."""
    if world == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous())
    return torch.cat(gathered)
