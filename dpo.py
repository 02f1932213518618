"""The DPO objective: sequence log-probs in, per-pair losses, implicit rewards and metrics out.

Every loss here is a function of one number per preference pair, the log-ratio margin

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

(c = chosen, r = rejected; pi = policy being trained, ref = frozen reference). The loss types
differ only in what they do with beta * h; see `preference_loss`.
"""
import math

import torch
import torch.nn.functional as F

from data.batches import PackedBatch, PairBatch
from errors import ConfigError

# --- log-probs

LOGSUMEXP_CHUNK = 1024  # rows of (rows, vocab) logits upcast to fp32 at a time


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] for packed (N, V) logits, without an fp32 (N, V) tensor.

    The naive `logits.float().log_softmax(-1).gather(...)` keeps an fp32 (N, V) copy alive for
    backward. Here forward keeps only the logits (which exist anyway) and one logsumexp per row;
    backward rebuilds softmax chunk by chunk: d/dlogits = grad * (onehot(target) - softmax).
    """

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.cat([chunk.float().logsumexp(-1) for chunk in logits.split(LOGSUMEXP_CHUNK)])  # (N,)
        target_logits = logits.gather(-1, targets[:, None]).squeeze(-1).float()
        ctx.save_for_backward(logits, targets, lse)
        return target_logits - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.size(0), LOGSUMEXP_CHUNK):
            rows = slice(start, start + LOGSUMEXP_CHUNK)
            probs = (logits[rows].float() - lse[rows, None]).exp_()  # softmax, (chunk, V) fp32
            grad = probs.mul_(-grad_out[rows, None])
            grad.scatter_add_(-1, targets[rows, None], grad_out[rows, None].float())
            grad_logits[rows] = grad
        return grad_logits, None


def token_logps(logits, targets):
    """(N, V) logits of any float dtype, (N,) target ids -> (N,) fp32 log-probs of the targets."""
    return _TokenLogps.apply(logits, targets)


def response_logps(model, input_ids, response_mask, attention_mask=None, average=False):
    """Sum over response tokens of log p(token | everything before it): (B,) fp32.

    input_ids: (B, T) prompt + response (+ right padding); response_mask: (B, T) bool, True at the
    response tokens being scored. The token at t is predicted by the logits at t - 1, so the LM head
    runs only at positions t - 1 for response tokens t (the model's logits_at): at 64 + 24 tokens
    that is 24 of 88 rows of the largest matmul, and the (rows, 50257) logits are all that is kept.
    average=True divides by the number of response tokens (IPO's length-normalised log-probs).
    attention_mask: None for right-padded batches (plain causal attention is exact there).
    """
    if response_mask[:, 0].any():
        raise ValueError("a response token at position 0 has no prefix to be predicted from; "
                         "every sequence needs at least one prompt token")
    head_mask = torch.zeros_like(response_mask)
    head_mask[:, :-1] = response_mask[:, 1:]  # (B, T): positions whose logits predict a response token
    logits = model(input_ids, attention_mask=attention_mask, logits_at=head_mask)  # (N, V)
    targets = input_ids[:, 1:][response_mask[:, 1:]]  # (N,), same row-major order as the packed logits
    per_token = token_logps(logits, targets)  # (N,)
    row_of_token = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(head_mask)[head_mask]
    logps = torch.zeros(input_ids.size(0), dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, row_of_token, per_token)  # (B,)
    if average:
        logps = logps / response_mask.sum(-1).clamp(min=1)
    return logps


def shared_prompt_logps(model, batch: PackedBatch, average=False):
    """(2B,) chosen-then-rejected log-probs from a batch of collate_pairs_shared_prompt: one packed
    row per prompt, [prompt | response | ...], the prompt computed once for all its responses."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_at=batch.predictor_index)  # (N, V)
    per_token = token_logps(logits, batch.target_ids)  # (N,)
    slot_lengths = batch.slot_lengths
    slot_logps = torch.zeros(slot_lengths.size(0), dtype=torch.float32, device=per_token.device)
    slot_logps = slot_logps.index_add(0, batch.target_slot, per_token)  # (S,): one per distinct response
    if average:
        slot_logps = slot_logps / slot_lengths
    return torch.cat([slot_logps[batch.chosen_slot], slot_logps[batch.rejected_slot]])  # (2B,)


def concatenated_logps(model, batch: PairBatch | PackedBatch, average=False):
    """Chosen and rejected log-probs, (B,) each, from ONE forward pass: one all-gather of each FSDP
    unit instead of two. The batch is either a PairBatch, 2B rows (0..B-1 chosen, B..2B-1
    rejected), or a PackedBatch, one row per prompt (the prompt runs once)."""
    if isinstance(batch, PackedBatch):
        logps = shared_prompt_logps(model, batch, average=average)
    elif isinstance(batch, PairBatch):
        logps = response_logps(model, batch.input_ids, batch.response_mask, average=average)
    else:
        raise TypeError(f"concatenated_logps: expected a PairBatch or a PackedBatch, got {type(batch).__name__}")
    n_pairs = logps.size(0) // 2
    return logps[:n_pairs], logps[n_pairs:]

# --- losses

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


def check_loss_settings(beta, loss_type, label_smoothing):
    """The loss settings' rules, here and in the trainer's config check (one message each)."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; valid loss types are {', '.join(LOSS_TYPES)}")
    if not (math.isfinite(float(beta)) and float(beta) > 0):
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}; it is the KL penalty strength "
                          "(DPO papers use 0.1 to 0.5)")
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}; it is the assumed "
                          "probability that a preference label is flipped (0 = labels are trusted)")
    if label_smoothing > 0 and loss_type in ("ipo", "hinge"):
        raise ConfigError(f"label_smoothing={label_smoothing!r} is not defined for loss_type {loss_type!r}; "
                          "it only applies to 'sigmoid' (cDPO) and 'robust'. Set label_smoothing=0")


def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False):
    """Per-pair preference losses and implicit rewards.

    All four log-prob inputs are (B,) tensors, one sequence log-prob per pair. Whether those are
    summed over the response tokens or averaged per token is the caller's choice (the trainer
    exposes it as a config option); this function uses whatever it is given. DPO's paper uses
    summed log-probs; IPO's paper (Azar et al. 2023) means length-averaged ones.

    loss_type (z = beta * h, eps = label_smoothing):
      "sigmoid": DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(z). With eps > 0 it is
                 conservative DPO (cDPO, Mitchell 2023), which assumes each label is flipped with
                 probability eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).
      "robust":  unbiased robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"):
                 [(1 - eps)(-log sigmoid(z)) - eps(-log sigmoid(-z))] / (1 - 2 eps).
                 Its expectation over eps-noisy labels is the clean DPO loss. It can be negative.
      "ipo":     IPO (Azar et al. 2023, Eq. 17): (h - 1 / (2 beta))^2, beta playing IPO's tau.
      "hinge":   SLiC's hinge (Zhao et al. 2023): relu(1 - z).

    reference_free=True takes the reference log-probs as 0 everywhere (in h and in the rewards);
    the reference tensors are then ignored and may be None.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,) fp32. The rewards are the
    implicit DPO rewards beta * (policy - reference) log-probs, detached: they are for logging.
    Everything is computed in fp32 even for bf16/fp16 inputs; gradients flow back to the inputs.
    """
    check_loss_settings(beta, loss_type, label_smoothing)
    named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps}
    if not reference_free:
        named |= {"reference_chosen_logps": reference_chosen_logps,
                  "reference_rejected_logps": reference_rejected_logps}
    for name, logps in named.items():
        if not isinstance(logps, torch.Tensor):
            raise ValueError(f"{name} must be a (B,) tensor of sequence log-probs, got {type(logps).__name__}"
                             + ("; pass reference_free=True to train without a reference model"
                                if logps is None else ""))
    shapes = {name: tuple(logps.shape) for name, logps in named.items()}
    if len(set(shapes.values())) != 1 or len(policy_chosen_logps.shape) != 1:
        raise ValueError(f"log-prob inputs must all have the same shape (B,), one sequence log-prob per "
                         f"preference pair; got {shapes}")

    # Upcast before any arithmetic: in bf16, (-256) - (-1.0078125) already rounds to -255.
    policy_chosen_logps = policy_chosen_logps.float()
    policy_rejected_logps = policy_rejected_logps.float()
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    else:
        reference_chosen_logps = reference_chosen_logps.float()
        reference_rejected_logps = reference_rejected_logps.float()

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    z = beta * h
    eps = float(label_smoothing)

    # logsigmoid, not log(sigmoid): log(sigmoid(-1e4)) is log(0) = -inf in fp32.
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # DPO Eq. 7; cDPO when eps > 0
    elif loss_type == "robust":
        # Chowdhury et al. 2024: the true-label loss minus the flipped-label loss, weighted so that
        # the eps-noise cancels in expectation.
        losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO Eq. 17, regress h onto 1/(2 tau)
    else:  # hinge
        losses = F.relu(1 - z)  # SLiC hinge with margin 1 on beta * h

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# --- metrics

def preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Batch means for logging, as 0-dim fp32 tensors left on the inputs' device and detached.

    No .item() here: the trainer all-reduces these and syncs with the host once per log step.
    Names follow TRL's so dashboards read the same.
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
