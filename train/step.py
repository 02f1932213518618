"""One optimizer step of the job: a micro-batch's loss (DPO, or SFT's likelihood), the step over a
rank's micro-batches with the finite check, which pairs make step N (a pure function of seed, epoch
and position), the accounting of steps that were not applied, and the metrics averaged over ranks.
fsdp_train.py runs it in its loop; the SFT warm start (warm_start.py) and the benchmarks call it too.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.batches import PackedBatch, PairBatch, collate, epoch_order, grouped_epoch_order, rank_slice, step_batch
from dpo import concatenated_logps, dpo_loss, reward_model_loss, sft_loss, unlikelihood_loss
from errors import TrainingStopped
from train import checkpoint
from train.config import logps_average, shares_prompt


# ----------------------------------------------------------------------------- the training step

def batch_loss(policy, reference, batch: PairBatch | PackedBatch, cfg, reference_logps=None):
    """Mean loss and metrics of one micro-batch. One forward over chosen+rejected for the policy,
    one for the reference, unless reference_logps ((B, 2) summed chosen, rejected) were precomputed."""
    if cfg.objective == "sft":  # negative log-likelihood per chosen-response token
        return sft_loss(policy, batch)
    if cfg.objective == "unlikelihood":  # the paper's baseline: likelihood of y_w, unlikelihood of y_l
        return unlikelihood_loss(policy, batch, cfg.unlikelihood_alpha)
    if cfg.objective == "reward_model":  # Bradley-Terry on the score head
        return reward_model_loss(policy, batch)
    policy_logps = concatenated_logps(policy, batch)
    if cfg.reference_free:
        reference_chosen = reference_rejected = None
    elif reference_logps is not None:
        reference_chosen, reference_rejected = reference_logps.unbind(-1)
    else:
        with torch.no_grad():
            reference_pair_logps = concatenated_logps(reference, batch)
        reference_chosen, reference_rejected = reference_pair_logps.chosen, reference_pair_logps.rejected
    losses, metrics = dpo_loss(policy_logps, reference_chosen, reference_rejected, beta=cfg.beta,
                               loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                               reference_free=cfg.reference_free, average=logps_average(cfg))
    return losses.mean(), metrics


def train_step(policy, reference, optimizer, micro_batches, cfg, lr, scaler, reference_logps=None,
               stop_requests=None):
    """One optimizer step of the preference objectives over this rank's micro-batches (optimizer_step).
    reference_logps: None, or one precomputed (B, 2) tensor per micro-batch. Each micro-batch's loss is
    divided by their number, so the gradient is the mean over the rank's pairs; FSDP's reduce-scatter
    then averages over ranks: the mean over the global batch."""
    n_micro = len(micro_batches)

    def share_of(i, batch):
        loss, metrics = batch_loss(policy, reference, batch, cfg, None if reference_logps is None else reference_logps[i])
        return loss * (1.0 / n_micro), {k: v / n_micro for k, v in metrics.items()}  # as scale / n_micro, bit for bit
    return optimizer_step(policy, optimizer, micro_batches, share_of, cfg, lr, scaler, stop_requests)


def optimizer_step(policy, optimizer, micro_batches, share_of, cfg, lr, scaler, stop_requests=None):
    """One optimizer step over this rank's micro-batches; share_of(i, batch) -> (micro-batch i's share of
    the rank's loss, its share of each metric), so that the shares add up to the rank's loss (DPO's,
    PPO's: ppo_step.py). Returns (metrics, grad_norm, applied, stop_signal).

    A step whose loss or global gradient norm is not finite is not applied. stop_signal: the
    SIGTERM/SIGINT that any rank's stop_requests received before this step's check (0: none), agreed
    by every rank in the same all-reduce as the finite check: one host sync per step.
    """
    n_micro = len(micro_batches)
    summed = {}
    for i, batch in enumerate(micro_batches):
        # Reduce-scatter once, after the last micro-batch; in between, FSDP keeps the blocks' unsharded
        # gradients (more memory, 1/n_micro the gradient traffic).
        if hasattr(policy, "set_requires_gradient_sync"):
            policy.set_requires_gradient_sync(i == n_micro - 1)
        loss, metrics = share_of(i, batch)
        (loss * scaler.scale).backward()
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    params = [p for p in policy.parameters() if p.grad is not None]
    if scaler.enabled:
        for p in params:
            p.grad.mul_(1.0 / scaler.scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # Every rank must take the same branch: the norm is global already, each rank's loss is not.
    not_finite = ~(torch.isfinite(grad_norm) & torch.isfinite(summed["loss"]))
    local_signal = stop_requests.local_signal() if stop_requests is not None else 0.0
    flags = torch.stack([not_finite.float().reshape(()), torch.full((), local_signal, device=not_finite.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_not_finite, stop_signal = flags.tolist()  # the step's one host sync
    finite = not any_not_finite
    if finite:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scaler.update(finite)
    return summed, grad_norm, finite, int(stop_signal)


# ----------------------------------------------------------------------------- one step's micro-batches

@dataclass
class StepInput:
    epoch: int
    pair_indices: list[int]  # the global batch, as indices into the training pairs (for messages)
    micro_batches: list  # this rank's PairBatch / PackedBatch tensors, on the device
    reference_logps: list | None  # precomputed (B, 2) per micro-batch, or None to run the reference
    n_tokens: int  # this rank's tokens, chosen and rejected counted as if run separately


def assemble_step(step, train_pairs, cfg, rank, world, device, cached_reference_logps=None) -> StepInput:
    """The global batch of optimizer step `step` (a pure function of seed, epoch and position),
    this rank's slice of it, cut into micro-batches."""
    epoch, global_batch = step_batch(step, len(train_pairs), cfg.batch_size, lambda epoch: (
        grouped_epoch_order(train_pairs, cfg.seed, epoch) if cfg.group_order
        else epoch_order(len(train_pairs), cfg.seed, epoch)))
    local = rank_slice(global_batch, rank, world)
    micro_batches, n_tokens = [], 0
    reference_logps = None if cached_reference_logps is None else []
    for start in range(0, len(local), cfg.micro_batch_size):
        indices = local[start:start + cfg.micro_batch_size]
        pairs = [train_pairs[i] for i in indices]
        micro_batches.append(collate(pairs, shares_prompt(cfg)).to(device))
        if cached_reference_logps is not None:
            reference_logps.append(cached_reference_logps[torch.tensor(indices, device=device)])
        n_tokens += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    return StepInput(epoch, global_batch, micro_batches, reference_logps, n_tokens)


def count_bad_step(step, metrics, grad_norm, items, epoch, scaler, bad_steps, cfg, log, what="pairs") -> int:
    """A step that was not applied. fp16 overflows are routine (the scaler halves its scale and
    retries on the next batch); a non-finite step at the smallest scale is a real one, as is any in
    bf16/fp32: counted, and past max_bad_steps the run stops."""
    if scaler.enabled and scaler.scale > scaler.min_scale:
        return bad_steps
    bad_steps += 1
    log(f"step {step + 1}: non-finite loss ({float(metrics['loss']):.4g}) or gradient norm "
        f"({float(grad_norm):.4g}) on {what} {items[:8]}{'...' if len(items) > 8 else ''} "
        f"(epoch {epoch}); the update was not applied ({bad_steps} such step(s), max_bad_steps={cfg.max_bad_steps})")
    if bad_steps > cfg.max_bad_steps:
        ckpts = checkpoint.complete_checkpoints(cfg.out_dir)
        raise TrainingStopped(f"stopping at step {step + 1}: non-finite loss or gradient norm. Last good "
                              f"checkpoint: {ckpts[-1][1] if ckpts else 'none'}")
    return bad_steps


def reduce_across_ranks(metrics, grad_norm, n_tokens, world, device):
    """(each metric averaged over ranks, with grad_norm; the tokens summed over ranks)."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[k].float() for k in names] + [torch.tensor(float(n_tokens), device=device)])
    dist.all_reduce(stacked)  # sums: the metrics are then averaged over ranks, the tokens not
    values = dict(zip(names, (stacked[:-1] / world).tolist()))
    values["grad_norm"] = float(grad_norm)
    return values, stacked[-1].item()
