"""The DPO objective: sequence log-probs in, per-pair losses, implicit rewards and metrics out.

Every loss here is a function of one number per preference pair, the log-ratio margin

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

(c = chosen, r = rejected; pi = policy being trained, ref = frozen reference). The loss types
differ only in what they do with beta * h; see `preference_loss`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.batches import PackedBatch, PairBatch
from gpt2 import last_token_index, padding_inputs
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


def scored_token_sums(model, input_ids, predictor_index, target_ids, sequence_of_token, n_sequences,
                      token_weight=None, **model_inputs):
    """The core of every log-prob here: per sequence, (summed log-probs (S,) fp32, summed mean
    logits (S,) fp32, detached) of the scored tokens. predictor_index: (N,) flat indices into the
    B*T positions whose logits predict target_ids (N,); sequence_of_token: (N,) in 0..S-1;
    token_weight: optional (N,) 0/1 weights (tokens past an end-of-text in a sample).

    All index tensors: no data-dependent shape in here, so no host sync. The LM head runs only at
    the predicting positions (the model's logits_at): at 64 + 24 tokens that is 24 of 88 rows of
    the largest matmul, and the (N, 50257) logits are all that is kept."""
    logits = model(input_ids, logits_at=predictor_index, **model_inputs)  # (N, V)
    per_token = token_logps(logits, target_ids)  # (N,)
    mean_logits = logits.detach().mean(-1, dtype=torch.float32)  # (N,): TRL's logits/* metric
    if token_weight is not None:
        per_token, mean_logits = per_token * token_weight, mean_logits * token_weight
    return (_sum_per_sequence(per_token, sequence_of_token, n_sequences),
            _sum_per_sequence(mean_logits, sequence_of_token, n_sequences))


def _sum_per_sequence(values, sequence_of_value, n_sequences):
    """(N,) values -> (n_sequences,) fp32 sums, without a host sync."""
    sums = torch.zeros(n_sequences, dtype=torch.float32, device=values.device)
    return sums.index_add(0, sequence_of_value, values.float())


def response_logps(model, input_ids, response_mask, attention_mask=None, average=False):
    """Sum over response tokens of log p(token | everything before it): (B,) fp32.

    input_ids: (B, T) prompt + response (+ padding); response_mask: (B, T) bool, True at the
    response tokens being scored (position t is predicted by the logits at t - 1).
    average=True divides by the number of response tokens. attention_mask: None for right-padded
    batches (plain causal attention is exact there). Builds its index tensors from the mask, which
    syncs with the host: the trainer's batches bring theirs from collate (concatenated_logps,
    sft_loss) and samples use span_kl.
    """
    if response_mask[:, 0].any():
        raise ValueError("a response token at position 0 has no prefix to be predicted from; "
                         "every sequence needs at least one prompt token")
    B, T = input_ids.shape
    target_positions = response_mask.flatten().nonzero().squeeze(1)  # (N,) flat, row-major
    logps, _ = scored_token_sums(model, input_ids, target_positions - 1, input_ids.flatten()[target_positions],
                                 target_positions // T, B, **padded_model_inputs(attention_mask))
    if average:
        logps = logps / response_mask.sum(-1).clamp(min=1)
    return logps


@torch.no_grad()
def span_kl(policy, reference, input_ids, start, attention_mask, token_mask):
    """Of continuations sampled from `policy` at columns start..T-1 after left-padded prompts that end
    at column start - 1, counting the positions where token_mask is True (up to and including each
    one's first <|endoftext|>; none of the padding after it), per row (B,) fp32:

      kl         the sum over the continuation's positions of the full KL(policy || reference) of the
                 two next-token distributions, sum_v p(v) (log p(v) - log q(v)): the DPO paper's
                 sequence-level KL (its footnote 3, "the sum of the per-timestep KL-divergences");
      log_ratio  log policy(y|x) - log reference(y|x) of the sampled tokens y: the one-sample estimate,
                 with the same expectation over samples and far more variance (it can be negative).

    Rows go through both models about LOGSUMEXP_CHUNK positions at a time, so no (B * span, V) fp32
    tensor is made for long samples. Collective under FSDP (each chunk is a forward of both models):
    every rank passes the same B and T. Index tensors are arithmetic on the device: no host sync."""
    B, T = input_ids.shape
    span, device = T - start, input_ids.device
    kl, log_ratio = [], []
    for rows in torch.arange(B, device=device).split(max(1, LOGSUMEXP_CHUNK // span)):
        ids, n = input_ids[rows], len(rows)
        predictor_index = (torch.arange(n, device=device)[:, None] * T
                           + torch.arange(start - 1, T - 1, device=device)).flatten()  # (n * span,)
        model_inputs = padded_model_inputs(attention_mask[rows])
        log_p = policy(ids, logits_at=predictor_index, **model_inputs).float().log_softmax(-1)  # (n * span, V)
        log_q = reference(ids, logits_at=predictor_index, **model_inputs).float().log_softmax(-1)
        targets = ids[:, start:].reshape(-1, 1)
        sampled = (log_p.gather(-1, targets) - log_q.gather(-1, targets)).view(n, span)
        per_vocab = (log_p - log_q).mul_(log_p.exp())  # p(v) (log p(v) - log q(v)), (n * span, V)
        # >= 0 in exact arithmetic; the clamp removes float rounding (-1e-9) where p and q nearly agree
        per_position = per_vocab.sum(-1).clamp_(min=0).view(n, span)
        weight = token_mask[rows, start:].float()
        kl.append((per_position * weight).sum(-1))
        log_ratio.append((sampled * weight).sum(-1))
    return torch.cat(kl), torch.cat(log_ratio)


def padded_model_inputs(attention_mask):
    """The model's position_ids and mask for rows padded as the (B, T) attention_mask says; none for
    None (right padding, where plain causal attention is exact)."""
    if attention_mask is None:
        return {}
    position_ids, mask = padding_inputs(attention_mask)
    return {"position_ids": position_ids, "mask": mask}


def chosen_logps(model, batch: PairBatch):
    """(summed log-probs (B,) fp32, token counts (B,)) of each pair's chosen response, running only
    the chosen rows (0..B-1), whose tokens are the batch's first n_chosen_tokens: what SFT reads."""
    n_pairs, n = batch.input_ids.size(0) // 2, batch.n_chosen_tokens
    logps, _ = scored_token_sums(model, batch.input_ids[:n_pairs], batch.predictor_index[:n], batch.target_ids[:n],
                                 batch.target_row[:n], n_pairs)
    return logps, torch.bincount(batch.target_row[:n], minlength=n_pairs)


def sft_loss(model, batch: PairBatch):
    """SFT (the DPO paper's first stage): negative log-likelihood per chosen-response token, and its
    metrics (chosen_logps)."""
    chosen, _ = chosen_logps(model, batch)
    loss = -chosen.sum() / batch.n_chosen_tokens
    return loss, {"loss": loss.detach(), "logps/chosen": chosen.detach().mean()}


def unlikelihood_loss(model, batch: PairBatch, alpha: float):
    """The DPO paper's unlikelihood baseline (Sec. 6: maximise log p(y_w|x) and push down y_l with a
    coefficient alpha), the token-level unlikelihood of Welleck et al. 2019 (Eq. 4, with the
    dispreferred response's tokens as the negative candidates):
        loss = -(1/N_w) sum_t log p(y_w,t | x, y_w,<t) - alpha (1/N_l) sum_t log(1 - p(y_l,t | x, y_l,<t))
    N_w, N_l: the batch's chosen and rejected tokens (per-token means, as sft_loss). One forward over
    the batch's 2B rows; p is kept below 1 - 1e-6 in the second term so its gradient stays finite."""
    n_rows, n = batch.input_ids.size(0), batch.n_chosen_tokens
    logits = model(batch.input_ids, logits_at=batch.predictor_index)  # (N, V): chosen tokens first
    per_token = token_logps(logits, batch.target_ids)  # (N,) fp32
    chosen, rejected = per_token[:n], per_token[n:]
    likelihood = -chosen.sum() / n
    unlikelihood = -torch.log1p(-rejected.exp().clamp(max=1 - 1e-6)).sum() / max(1, rejected.numel())
    loss = likelihood + alpha * unlikelihood
    sums = _sum_per_sequence(per_token.detach(), batch.target_row, n_rows)  # (2B,)
    return loss, {"loss": loss.detach(), "nll/chosen": likelihood.detach(),
                  "unlikelihood/rejected": unlikelihood.detach(), "logps/chosen": sums[:n_rows // 2].mean(),
                  "logps/rejected": sums[n_rows // 2:].mean()}


def sequence_scores(model, input_ids):
    """A reward model's score of each right-padded row, (B,) fp32: the score head read at the row's last
    token that is not <|endoftext|> (gpt2.last_token_index: where transformers'
    GPT2ForSequenceClassification reads it, so the export scores as this does)."""
    rows, T = input_ids.shape
    read_at = torch.arange(rows, device=input_ids.device) * T + last_token_index(input_ids)
    return model(input_ids, logits_at=read_at, head="score")


def reward_model_loss(model, batch: PairBatch):
    """The reward model of the DPO paper's Eq. 2 (Bradley-Terry, as Ziegler et al. 2019 and Stiennon et
    al. 2020 train it for PPO), on one batch (bradley_terry)."""
    return bradley_terry(*sequence_scores(model, batch.input_ids).chunk(2))  # the chosen rows first


def bradley_terry(chosen, rejected):
    """(B,) scores of the chosen and the rejected responses -> (loss = -mean log sigmoid(r_c - r_r), its
    metrics under DPO's names, rewards/* being the scores themselves)."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"loss": loss.detach(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                  "rewards/accuracies": (chosen > rejected).float().mean(),
                  "rewards/margins": (chosen - rejected).mean()}


@dataclass
class PairLogps:
    """One forward over a batch of B pairs, per pair: (B,) fp32 tensors. Log-probs are summed over
    each response's tokens; `sequence_logps(average=True)` gives them per token (IPO's)."""
    chosen: torch.Tensor  # summed log-probs of the chosen response
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # scored tokens in each response
    rejected_tokens: torch.Tensor
    chosen_logits: torch.Tensor  # detached: the sum over the response's tokens of the mean logit over the vocabulary
    rejected_logits: torch.Tensor

    def sequence_logps(self, average: bool):
        """(chosen, rejected) log-probs as a loss takes them: summed, or averaged per token."""
        if average:
            return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens
        return self.chosen, self.rejected


def concatenated_logps(model, batch: PairBatch | PackedBatch) -> PairLogps:
    """Chosen and rejected log-probs of every pair from ONE forward pass: one all-gather of each FSDP
    unit instead of two. The batch is either a PairBatch, 2B rows (0..B-1 chosen, B..2B-1
    rejected), or a PackedBatch, one row per prompt [prompt | response | ...], the prompt computed
    once for all its responses (each distinct response, a "slot", scored once)."""
    if isinstance(batch, PackedBatch):
        sequence_of_token, n_sequences, lengths = batch.target_slot, batch.slot_lengths.size(0), batch.slot_lengths
        chosen, rejected = batch.chosen_slot, batch.rejected_slot
        model_inputs = {"mask": batch.attention_mask[:, None], "position_ids": batch.position_ids}  # (G, 1, L, L)
    elif isinstance(batch, PairBatch):
        sequence_of_token, n_sequences = batch.target_row, batch.input_ids.size(0)
        lengths = batch.response_mask.sum(-1)
        chosen = torch.arange(n_sequences // 2, device=lengths.device)
        rejected = chosen + n_sequences // 2
        model_inputs = {}  # right-padded rows: plain causal attention is exact
    else:
        raise TypeError(f"concatenated_logps: expected a PairBatch or a PackedBatch, got {type(batch).__name__}")
    logps, logit_sums = scored_token_sums(model, batch.input_ids, batch.predictor_index, batch.target_ids,
                                          sequence_of_token, n_sequences, **model_inputs)  # (S,) each
    lengths = lengths.float()
    return PairLogps(logps[chosen], logps[rejected], lengths[chosen], lengths[rejected],
                     logit_sums[chosen], logit_sums[rejected])


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

    Returns (losses, chosen_rewards, rejected_rewards), each (B,). The rewards are the implicit DPO
    rewards beta * (policy - reference) log-probs, detached. Everything is computed in fp32 for
    bf16/fp16/fp32 inputs and in fp64 for fp64 ones; gradients flow back to the inputs.
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

    # Upcast before any arithmetic: in bf16, (-256) - (-1.0078125) already rounds to -255. Never
    # down: fp64 inputs are computed in fp64.
    policy_chosen_logps, policy_rejected_logps = _at_least_fp32(policy_chosen_logps), _at_least_fp32(policy_rejected_logps)
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    else:
        reference_chosen_logps = _at_least_fp32(reference_chosen_logps)
        reference_rejected_logps = _at_least_fp32(reference_rejected_logps)

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


def _at_least_fp32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def dpo_loss(policy: PairLogps, reference_chosen_logps, reference_rejected_logps, beta, loss_type="sigmoid",
             label_smoothing=0.0, reference_free=False, average=False):
    """Per-pair losses and their logging metrics from the policy's PairLogps and the reference's
    SUMMED log-probs ((B,) each; None when reference_free). average=True hands the loss per-token
    averages (IPO's, logps=auto); the metrics stay on summed log-probs either way (preference_metrics)."""
    policy_chosen, policy_rejected = policy.sequence_logps(average)
    reference_chosen = reference_rejected = None
    if not reference_free:
        reference_chosen, reference_rejected = reference_chosen_logps, reference_rejected_logps
        if average:  # the same responses, so the policy's token counts
            reference_chosen, reference_rejected = (reference_chosen / policy.chosen_tokens,
                                                    reference_rejected / policy.rejected_tokens)
    losses, _, _ = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta,
                                   loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free)
    metrics = preference_metrics(losses, policy, None if reference_free else reference_chosen_logps,
                                 None if reference_free else reference_rejected_logps, beta)
    return losses, metrics


# --- metrics

def preference_metrics(losses, policy: PairLogps, reference_chosen_logps, reference_rejected_logps, beta):
    """Batch means for logging, as 0-dim fp32 tensors left on the inputs' device and detached.

    Rewards are beta * (policy - reference) SUMMED log-probs (reference None: 0) and logps/* are
    summed, whatever the loss was computed on (IPO trains on per-token averages), as TRL logs them:
    dashboards of different loss types share one scale. logits/* is the mean logit over the
    vocabulary and the scored tokens of the batch's chosen (rejected) responses, as TRL's.
    No .item() here: the trainer all-reduces these and syncs with the host once per log step.
    """
    policy_chosen, policy_rejected = policy.chosen.detach().float(), policy.rejected.detach().float()
    if reference_chosen_logps is None:
        chosen_rewards, rejected_rewards = beta * policy_chosen, beta * policy_rejected
    else:
        chosen_rewards = beta * (policy_chosen - reference_chosen_logps.detach().float())
        rejected_rewards = beta * (policy_rejected - reference_rejected_logps.detach().float())
    return {
        "loss": losses.detach().float().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.mean(),
        "logps/rejected": policy_rejected.mean(),
        "logits/chosen": policy.chosen_logits.sum() / policy.chosen_tokens.sum(),
        "logits/rejected": policy.rejected_logits.sum() / policy.rejected_tokens.sum(),
    }
