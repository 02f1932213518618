"""One PPO step after its rollout (rollout.py): each token's reward (the KL penalty, and the normalised
score at the last token), GAE's advantages and returns, then ppo_epochs passes over the rollout in
shuffled mini-batches, each one optimizer step (step.optimizer_step: the finite check, clipping, the
stop signal) of the clipped policy loss plus vf_coef times the clipped value loss (ppo.py).

Every rank holds the whole rollout, so each mini-batch is the same set of rollouts whatever the world
size; a rank runs its slice of it, and each token's loss is divided by the mini-batch's token count
over all ranks (times the world size, which FSDP's gradient average divides out again): two ranks
take the step that one process takes."""
import numpy as np
import torch

from data.batches import rank_slice
from ppo import gae, kl_penalised_rewards, masked_sum, normalised, policy_loss, value_loss, whiten
from train.rollout import Rollout, response_forward
from train.step import count_bad_step, optimizer_step


def advantages_of(rollout: Rollout, kl_coef, score_mean, score_std, cfg):
    """(per-token rewards, whitened advantages, returns), (B, N) each, the same on every rank."""
    mask = rollout.mask.float()
    scores = normalised(rollout.scores, score_mean, score_std)
    rewards = kl_penalised_rewards(scores, rollout.logps, rollout.ref_logps, mask, kl_coef)
    advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    return rewards, whiten(advantages, mask), returns


def minibatch_order(seed, step, epoch, n_rollouts) -> list[int]:
    """The rollouts of PPO step `step`, pass `epoch`, shuffled: a pure function of them (exact resume)."""
    return np.random.default_rng([seed, step, epoch]).permutation(n_rollouts).tolist()


def ppo_updates(state, rollout: Rollout, advantages, returns, cfg, step, lr, rank, world, device, log,
                bad_steps=0, stop_requests=None):
    """ppo_epochs x (batch_size / mini_batch_size) optimizer steps on one rollout. Returns (each metric
    averaged over the updates, this rank's share: reduce over ranks to log it; the last gradient norm;
    the stop signal any update saw; the rollout tokens this rank ran forward and backward; the run's
    count of updates not applied, bad_steps before it, which max_bad_steps bounds)."""
    summed, grad_norm, stop_signal, n_tokens, n_updates = {}, torch.zeros(()), 0, 0, 0
    for epoch in range(cfg.ppo_epochs):
        order = minibatch_order(cfg.seed, step, epoch, len(rollout.prompts))
        for start in range(0, len(order), cfg.mini_batch_size):
            minibatch = order[start:start + cfg.mini_batch_size]
            local = rank_slice(minibatch, rank, world)
            micro_batches = [torch.tensor(local[i:i + cfg.micro_batch_size], device=device)
                             for i in range(0, len(local), cfg.micro_batch_size)]
            count = rollout.mask[torch.tensor(minibatch, device=device)].sum().float()  # over all ranks

            def share_of(i, rows):
                return update_loss(state.policy, rollout, advantages, returns, rows, count, cfg, world)
            metrics, grad_norm, applied, signal = optimizer_step(state.policy, state.optimizer, micro_batches,
                                                                 share_of, cfg, lr, state.scaler, stop_requests)
            if not applied:
                bad_steps = count_bad_step(step, metrics, grad_norm, [rollout.prompt_indices[r] for r in minibatch],
                                           epoch, state.scaler, bad_steps, cfg, log, what="prompts")
            stop_signal = max(stop_signal, signal)
            n_tokens += sum(len(rollout.prompts[r]) + rollout.responses.size(1) for r in local)
            n_updates += 1
            for k, v in metrics.items():
                summed[k] = summed.get(k, 0.0) + v
    return {k: v / n_updates for k, v in summed.items()}, grad_norm, stop_signal, n_tokens, bad_steps


def update_loss(policy, rollout, advantages, returns, rows, count, cfg, world):
    """One micro-batch's share of the mini-batch's loss, and of its metrics (TRL's PPO names)."""
    logps, values, entropy = response_forward(policy, [rollout.prompts[r] for r in rows.tolist()],
                                              rollout.responses[rows], head="both", with_entropy=True)
    mask = rollout.mask[rows].float()
    pg_loss, pg_metrics = policy_loss(logps, rollout.logps[rows], advantages[rows], mask, cfg.cliprange, count)
    vf_loss, vf_metrics = value_loss(values, rollout.values[rows], returns[rows], mask, cfg.cliprange_value, count)
    loss = (pg_loss + cfg.vf_coef * vf_loss) * world
    metrics = {"loss": loss.detach(), "ppo/loss/policy": pg_loss.detach() * world,
               "ppo/loss/value": vf_loss.detach() * world, "ppo/policy/entropy": masked_sum(entropy, mask) / count * world,
               "ppo/val/vpred": masked_sum(values.detach(), mask) / count * world}
    metrics |= {f"ppo/{k}": v * world for k, v in (pg_metrics | vf_metrics).items()}
    return loss, metrics
