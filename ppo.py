"""PPO for language models, the math: the DPO paper's PPO baseline (its Sec. 6.1, Figure 2) as
Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Stiennon et al.
2020 describe it, with TRL's 2023 PPOTrainer's conventions where they leave a choice open.

A rollout is B sampled continuations, each a row of T token slots (mask: True up to and including
its first <|endoftext|>). Per token t, with the policy's log-prob logp_t of the sampled token and the
frozen reference's ref_logp_t:

    reward_t    = -kl_coef * (logp_t - ref_logp_t)          + score, at the row's last token only
    delta_t     = reward_t + gamma * V_{t+1} - V_t            (V after the last token: 0)
    advantage_t = delta_t + gamma * lam * advantage_{t+1}     (GAE, Schulman et al. 2016)
    return_t    = advantage_t + V_t
    policy loss = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)),  r_t = exp(logp_t - old_logp_t)
    value loss  = mean_t 0.5 max((V_t - R_t)^2, (clip(V_t, old_V_t - eps_v, old_V_t + eps_v) - R_t)^2)

with the advantages whitened over the rollout batch. Every mean here is over the mask's tokens,
divided by a count the caller may give (the global count, across ranks). ppo_train.py runs these;
tests/test_ppo.py checks each against a plain loop or the formula."""
import torch

from gpt2 import last_true_column


def masked_sum(values, mask):
    return (values * mask).sum()


def masked_mean(values, mask, count=None):
    """Mean of values over mask's tokens; count: the number to divide by (default: the mask's)."""
    return masked_sum(values, mask) / (mask.sum() if count is None else count)


def whiten(values, mask):
    """values normalised to mean 0 and variance 1 over mask's tokens (unbiased variance, as TRL's
    whiten); positions outside the mask are 0. (Every rank holds the whole rollout, so these are the
    global batch's statistics.)"""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = masked_sum(values, mask) / count
    var = (masked_sum(values * values, mask) / count - mean * mean) * count / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8) * mask


def kl_penalised_rewards(scores, logps, ref_logps, mask, kl_coef):
    """(B,) scores and (B, T) token log-probs -> (B, T) per-token rewards: -kl_coef times each
    token's log-ratio, and the score added at each row's last token (mask's last True)."""
    mask = mask.to(logps.dtype)
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = last_true_column(mask)
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last),
                             scores.to(rewards.dtype), accumulate=True)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimates and returns, (B, T) each, by the backward recursion. Tokens
    outside the mask (after a row's end) have no reward and no value, so a row's last token sees
    V = 0 after it: the episode ends there."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logps, old_logps, advantages, mask, cliprange, count=None):
    """PPO's clipped surrogate (to minimise), and its metrics: the fraction of tokens where the clip
    binds (TRL's policy/clipfrac) and 0.5 E[(logp - old_logp)^2] (its policy/approxkl)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask, count)
        approxkl = 0.5 * masked_mean(log_ratio * log_ratio, mask, count)
    return loss, {"policy/clipfrac": clipfrac, "policy/approxkl": approxkl}


def value_loss(values, old_values, returns, mask, cliprange_value, count=None):
    """PPO's clipped value loss (to minimise), and the fraction of tokens where the clip binds."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask, count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask, count)
    return loss, {"val/clipfrac": clipfrac}


def entropy_of(logits):
    """(N, V) logits -> (N,) fp32 entropy of each next-token distribution (a metric; no gradient)."""
    with torch.no_grad():
        log_p = logits.float().log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1)


class KLController:
    """The KL coefficient: fixed (target=None) or adaptive towards a target KL, Ziegler et al. 2019's
    proportional controller: after each rollout batch with mean sequence KL `kl`,
        kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon
    n_steps: the rollouts in that batch (TRL's convention: the batch size)."""

    def __init__(self, kl_coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = float(kl_coef), target, horizon

    def update(self, kl, n_steps):
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def normalised(scores, mean, std):
    """Scores normalised by the initial policy's (Ziegler et al. 2019: "we normalize the reward so that
    it has mean 0 and variance 1" over samples of the starting policy; the DPO paper's PPO "normalizes
    rewards"): fixed mean and std, so one ground-truth score means the same at every step."""
    return (scores - mean) / std
