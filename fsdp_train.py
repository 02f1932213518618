"""DPO (and SFT) training of GPT-2 with FSDP2.

    python fsdp_train.py --config_file config/demo.yaml                      # one process
    torchrun --nproc_per_node 8 fsdp_train.py --config_file config/gpt2_xl_hf.yaml --micro_batch_size=8
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint HOST:29500 fsdp_train.py ...

Read top to bottom: data, the training step, one step's micro-batches, metrics and log lines,
start or resume, then main() — the run as a table of contents — and run(), the one error
boundary. The distributed set-up and the models are parallel.py's; the run directory's files
run_dir.py's; evaluation, samples and the precomputed reference evaluation.py's.
Launching the same command again on an out_dir with a complete checkpoint resumes from it.
"""
import dataclasses
import gc
import json
import os
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import checkpoint
from data.batches import (Pair, PackedBatch, PairBatch, check_batch_sizes, collate, data_fingerprint, epoch_order,
                          grouped_epoch_order, pairs_of, rank_slice, split_groups, truncate_groups)
from data.formats import load_preferences
from dpo import concatenated_logps, dpo_loss, sft_loss
from errors import ConfigError, Preempted, TrainingStopped
from evaluation import evaluate, precompute_reference_logps, sample_texts
from export import training_command, write_export
from gpt2 import write_hf_checkpoint
from optim import lr_at
from parallel import (BAD_INPUT, TrainingState, build_training_state, check_model_fits, on_rank0,
                      reference_precision_name, setup_distributed)
from preemption import StopRequests
from reward import fetch_reward
from run_dir import (MetricsLog, check_shared_out_dir, check_writable, keep_metrics_until, lock_run_dir, unlock_run_dirs,
                     write_atomic, write_config, write_samples_before, write_samples_table)
from train_config import TrainConfig, data_options, logps_average, parse_args, shares_prompt

# Keys that fix a run's trajectory: a checkpoint is only resumed by a run that agrees on all of them,
# and on the fingerprints of its data and starting weights (run_identity). The data's file, format
# and length settings are in the data fingerprint: the same tokens from a moved file still resume.
# epochs and max_steps are not: raising them extends a finished run (README, 'Resume').
RUN_IDENTITY_KEYS = ("init_from", "n_layer", "n_head", "n_embd", "n_positions", "eval_fraction", "objective", "loss_type",
                     "beta", "label_smoothing", "reference_free", "logps", "lr", "weight_decay", "adam_beta1",
                     "adam_beta2", "warmup_steps", "lr_schedule", "grad_clip", "batch_size", "seed",
                     "precision", "reference_precision", "lm_head_precision", "group_order", "sft_on", "sft_steps", "sft_lr")


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig):
    """Files -> (train pairs, eval pairs, counts, the data's sha256). Runs before any process group
    or GPU work, so bad data stops the run before anything is written."""
    groups, counts = load_preferences(cfg.dataset, cfg.data_path, **data_options(cfg))
    groups, counts["dropped_by_truncation"] = truncate_groups(groups, cfg.max_prompt_len, cfg.max_len)
    train_groups, eval_groups = split_groups(groups, cfg.eval_fraction, cfg.seed)
    train_pairs, eval_pairs = pairs_of(train_groups), pairs_of(eval_groups)
    if cfg.objective == "sft" and cfg.sft_on == "all":
        train_pairs = sft_pairs(train_pairs)
    counts |= {"train_prompts": len(train_groups), "eval_prompts": len(eval_groups),
               "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(f"{len(train_pairs)} training pairs is fewer than batch_size={cfg.batch_size}")
    return train_pairs, eval_pairs, counts, data_fingerprint(groups)


# ----------------------------------------------------------------------------- the training step

def batch_loss(policy, reference, batch: PairBatch | PackedBatch, cfg, reference_logps=None):
    """Mean loss and metrics of one micro-batch. One forward over chosen+rejected for the policy,
    one for the reference, unless reference_logps ((B, 2) summed chosen, rejected) were precomputed."""
    if cfg.objective == "sft":  # negative log-likelihood per chosen-response token
        return sft_loss(policy, batch)
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
    """One optimizer step over this rank's micro-batches. Returns (metrics, grad_norm, applied,
    stop_signal). reference_logps: None, or one precomputed (B, 2) tensor per micro-batch.

    Each micro-batch's loss is divided by their number, so the gradient is the mean over the rank's
    pairs; FSDP's reduce-scatter then averages over ranks: the mean over the global batch. A step
    whose loss or global gradient norm is not finite is not applied. stop_signal: the SIGTERM/SIGINT
    that any rank's stop_requests received before this step's check (0: none), agreed by every rank
    in the same all-reduce as the finite check: one host sync per step.
    """
    n_micro = len(micro_batches)
    summed = {}
    for i, batch in enumerate(micro_batches):
        # Reduce-scatter once, after the last micro-batch; in between, FSDP keeps the blocks' unsharded
        # gradients (more memory, 1/n_micro the gradient traffic).
        if hasattr(policy, "set_requires_gradient_sync"):
            policy.set_requires_gradient_sync(i == n_micro - 1)
        loss, metrics = batch_loss(policy, reference, batch, cfg, None if reference_logps is None else reference_logps[i])
        (loss * (scaler.scale / n_micro)).backward()
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0.0) + v / n_micro
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
    epoch, position = divmod(step, len(train_pairs) // cfg.batch_size)
    order = (grouped_epoch_order(train_pairs, cfg.seed, epoch) if cfg.group_order
             else epoch_order(len(train_pairs), cfg.seed, epoch))
    global_batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
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


def count_bad_step(step, metrics, grad_norm, step_input, scaler, bad_steps, cfg, log) -> int:
    """A step that was not applied. fp16 overflows are routine (the scaler halves its scale and
    retries on the next batch); a non-finite step at the smallest scale is a real one, as is any in
    bf16/fp32: counted, and past max_bad_steps the run stops."""
    if scaler.enabled and scaler.scale > scaler.min_scale:
        return bad_steps
    bad_steps += 1
    pairs = step_input.pair_indices
    log(f"step {step + 1}: non-finite loss ({float(metrics['loss']):.4g}) or gradient norm "
        f"({float(grad_norm):.4g}) on pairs {pairs[:8]}{'...' if len(pairs) > 8 else ''} "
        f"(epoch {step_input.epoch}); the update was not applied ({bad_steps} such step(s), max_bad_steps={cfg.max_bad_steps})")
    if bad_steps > cfg.max_bad_steps:
        ckpts = checkpoint.complete_checkpoints(cfg.out_dir)
        raise TrainingStopped(f"stopping at step {step + 1}: non-finite loss or gradient norm. Last good "
                              f"checkpoint: {ckpts[-1][1] if ckpts else 'none'}")
    return bad_steps


# ----------------------------------------------------------------------------- metrics and log lines

def reduce_across_ranks(metrics, grad_norm, n_tokens, world, device):
    """(each metric averaged over ranks, with grad_norm; the tokens summed over ranks)."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[k].float() for k in names] + [torch.tensor(float(n_tokens), device=device)])
    dist.all_reduce(stacked)  # sums: the metrics are then averaged over ranks, the tokens not
    values = dict(zip(names, (stacked[:-1] / world).tolist()))
    values["grad_norm"] = float(grad_norm)
    return values, stacked[-1].item()


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_log_line(label, values, device=None, eta_s=None):
    """One progress line. "step N/M": loss, accuracy, margin, norm, lr, throughput, memory and time
    left; any other label ("eval", "final eval"): every logged metric but the step."""
    if not label.startswith("step "):
        return f"{label} | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in values.items() if k != "step")
    return (f"{label} | loss {values['loss']:.4f}"
            + (f" | acc {values['rewards/accuracies']:.2f} | margin {values['rewards/margins']:.3f}"
               if "rewards/margins" in values else "")
            + f" | norm {values['grad_norm']:.2f} | lr {values['lr']:.2e} | {values['tokens_per_s']:,.0f} tok/s"
            f" | mem {peak_memory_gib(device):.2f} GiB | eta {time.strftime('%H:%M:%S', time.gmtime(eta_s))}")


def log_on_rank0(rank):
    return print if rank == 0 else ignore


def ignore(*args, **kwargs):
    pass


# ----------------------------------------------------------------------------- start or resume

def run_identity(cfg: TrainConfig, data_sha256: str, weights_sha256: str) -> dict:
    """What a checkpoint must agree on to be resumed, and the reference cache to be reused."""
    identity = {k: getattr(cfg, k) for k in RUN_IDENTITY_KEYS}
    identity["reference_precision"] = reference_precision_name(cfg)  # "same" and its dtype are one run
    return identity | {"data_sha256": data_sha256, "weights_sha256": weights_sha256}


def identity_hints(cfg: TrainConfig) -> dict:
    """What a differing fingerprint means, for the message that refuses the checkpoint."""
    data = f"data_path={cfg.data_path!r}" if cfg.dataset != "demo" else "the demo set"
    return {"data_sha256": f"the preference pairs read from {data} (dataset={cfg.dataset}) are not the ones this "
                           "checkpoint was trained on",
            "weights_sha256": f"the starting weights of init_from={cfg.init_from!r} are not the ones this "
                              "checkpoint started from"}


def start_or_resume(cfg, identity, state, device, log, last_step) -> int | None:
    """Collective. The step to start from: that of the newest complete checkpoint, once it is found
    to be this run's (identity), intact (checksums) and loaded; else 0. Then the run directory is
    made to agree with it: partial checkpoints removed, config.yaml written, metrics.jsonl cut to
    the steps before it. None when that checkpoint is at or past last_step: the run is complete,
    and nothing in out_dir is touched."""
    on_rank0(checkpoint.recover_replaced_checkpoints, device, "recover checkpoints", cfg.out_dir, log)
    # rank 0 decides, every rank follows: on per-node disks, nodes that saw no checkpoint would skip
    # the load collective and hang (check_shared_out_dir refuses such disks first)
    path = on_rank0(checkpoint.newest_checkpoint, device, "list checkpoints", cfg.out_dir)
    step = 0
    if path:
        on_rank0(checkpoint.check_compatible, device, f"read {path}", path, identity, identity_hints(cfg))
        saved_step = on_rank0(checkpoint.saved_step, device, f"read {path}", path)
        if saved_step >= last_step:
            log(complete_message(cfg, path, saved_step, last_step))
            return None
    on_rank0(checkpoint.remove_partial_checkpoints, device, "clean up checkpoints", cfg.out_dir, log)
    if path:
        on_rank0(checkpoint.verify_checkpoint, device, f"verify {path}", path)
        train_state = checkpoint.load_checkpoint(path, state.policy, state.optimizer)
        step, state.scaler.scale, state.scaler.good_steps = (train_state["step"], train_state["loss_scale"],
                                                             train_state["good_steps"])
        log(f"resumed from {path} at step {step}")
    on_rank0(write_config, device, f"write {cfg.out_dir}/config.yaml", cfg)
    on_rank0(keep_metrics_until, device, f"prepare {cfg.out_dir}/metrics.jsonl", cfg.out_dir, step, log)
    return step


def complete_message(cfg, path, saved_step, last_step):
    limit = (f"max_steps={cfg.max_steps}" if cfg.max_steps and cfg.max_steps <= last_step
             else f"epochs={cfg.epochs} ({last_step} steps)")
    return (f"run complete: {path} is at step {saved_step} and this command trains to step {last_step} ({limit}); "
            f"nothing to do, nothing changed. To train on, raise max_steps or epochs (see README, 'Resume').")


def save(cfg, state, step, steps_per_epoch, identity, device):
    """Collective: a sharded checkpoint of step `step`, with what resuming needs besides the tensors."""
    checkpoint.save_checkpoint(cfg.out_dir, step, state.policy, state.optimizer, {
        "step": step, "loss_scale": state.scaler.scale, "good_steps": state.scaler.good_steps,
        "epoch": step // steps_per_epoch, "pairs_seen": step * cfg.batch_size, "identity": identity},
        cfg.keep_checkpoints, device)


def stop_after_signal(cfg, state, step, steps_per_epoch, identity, device, signum):
    """Collective: every rank received or was told of SIGTERM/SIGINT after this step; save, stop."""
    path, _ = checkpoint.step_dirs(cfg.out_dir, step)
    if not (cfg.ckpt_every and step % cfg.ckpt_every == 0):  # else just saved
        save(cfg, state, step, steps_per_epoch, identity, device)
    raise Preempted(signum, f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}. Run the "
                            "same command to resume from it.")


# ----------------------------------------------------------------------------- the SFT warm start

def warm_start(cfg, train_pairs, data_sha256, rank, world, device, mesh, log) -> TrainingState:
    """The paper's first stage in the same run (sft_steps): SFT of the starting weights on every
    response of the training pairs, preferred or not (the data's language, no preference), exported
    to out_dir/sft/; DPO then starts from it, and it is DPO's frozen reference. A relaunch reuses
    out_dir/sft/ when its sft.json matches, so a resumed DPO run keeps the same reference; an SFT
    stage cut short is redone from the start (it has no checkpoints of its own)."""
    state = build_training_state(dataclasses.replace(cfg, reference_free=True), rank, device, mesh)  # SFT needs none
    sft_dir = os.path.join(cfg.out_dir, "sft")
    recipe = {"from_weights_sha256": state.weights_sha256, "data_sha256": data_sha256, "sft_steps": cfg.sft_steps,
              "sft_lr": cfg.sft_lr or cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}
    if on_rank0(sft_recipe_of, device, f"read {sft_dir}/sft.json", sft_dir) != recipe:
        on_rank0(check_no_dpo_checkpoint, device, f"look for checkpoints in {cfg.out_dir}", cfg.out_dir, sft_dir)
        sft_cfg = dataclasses.replace(cfg, objective="sft", lr=cfg.sft_lr or cfg.lr)
        responses = sft_pairs(train_pairs)
        if len(responses) < cfg.batch_size:
            raise ConfigError(f"sft_steps: the training pairs hold {len(responses)} distinct responses, fewer than "
                              f"batch_size={cfg.batch_size}")
        for step in range(cfg.sft_steps):  # state's AdamW: train_step sets each step's lr (sft_lr's schedule)
            step_input = assemble_step(step, responses, sft_cfg, rank, world, device)
            metrics, grad_norm, _, _ = train_step(state.policy, None, state.optimizer, step_input.micro_batches,
                                                  sft_cfg, lr_at(step, cfg.sft_steps, sft_cfg), state.scaler)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.sft_steps:
                values, _ = reduce_across_ranks(metrics, grad_norm, 0, world, device)
                log(f"sft step {step + 1}/{cfg.sft_steps} | loss {values['loss']:.4f} | norm {values['grad_norm']:.2f}")
        full = get_model_state_dict(state.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        on_rank0(write_sft_model, device, f"write {sft_dir}", state.config, full, sft_dir, recipe)
        del full
    log(f"SFT warm start: {sft_dir} is DPO's starting point and reference")
    state.policy = state.optimizer = None  # freed before DPO's models are built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return build_training_state(dataclasses.replace(cfg, init_from=sft_dir), rank, device, mesh)


def check_no_dpo_checkpoint(out_dir, sft_dir):
    """A DPO checkpoint in out_dir was trained against out_dir/sft/ as it is: redoing the SFT stage
    (other sft_* settings, or sft.json gone) would replace its reference under it."""
    if checkpoint.newest_checkpoint(out_dir) is not None:
        raise ConfigError(f"{out_dir} holds DPO checkpoints trained from {sft_dir}, whose sft.json does not match "
                          "this run's SFT settings (sft_steps, sft_lr, batch_size, seed, data or starting weights); "
                          "use another out_dir, or the settings of the run that made them")


def sft_pairs(train_pairs):
    """Each distinct (prompt, response) of the training pairs once, as a Pair whose "chosen" is the
    response (SFT reads only the chosen rows)."""
    seen, pairs = set(), []
    for pair in train_pairs:
        for index, response in ((pair.chosen_index, pair.chosen), (pair.rejected_index, pair.rejected)):
            if (pair.group_index, index) not in seen:
                seen.add((pair.group_index, index))
                pairs.append(Pair(pair.prompt, response, response, pair.group_index, index, index))
    return pairs


def sft_recipe_of(sft_dir):
    path = os.path.join(sft_dir, "sft.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_sft_model(config, state_dict, sft_dir, recipe):
    if os.path.exists(os.path.join(sft_dir, "sft.json")):  # first: a crash below leaves no stale recipe
        os.remove(os.path.join(sft_dir, "sft.json"))
    write_hf_checkpoint(config, state_dict, sft_dir)
    write_atomic(os.path.join(sft_dir, "sft.json"), json.dumps(recipe))  # last: the model is complete


# ----------------------------------------------------------------------------- samples

def sample_prompts_of(eval_pairs, cfg):
    """The held-out prompts of the before/after table: n_samples, spread over the eval pairs."""
    return [p.prompt for p in eval_pairs[:: max(1, len(eval_pairs) // max(1, cfg.n_samples))]][:cfg.n_samples]



# ----------------------------------------------------------------------------- main

def main(argv=None, stop_requests=None):
    cfg = parse_args(argv)
    stop_requests = stop_requests or StopRequests()  # run() installs it as the SIGTERM/SIGINT handler
    train_pairs, eval_pairs, counts, data_sha256 = load_data(cfg)  # before any process group, GPU or file work
    # Every rank, before the first collective: a hub download (6.4 GB for gpt2-xl) can outlast NCCL's
    # 10-minute timeout, so no rank waits in a collective meanwhile (the hub cache's locks let one
    # process download and the others wait for the file). Then its config.json is checked.
    check_model_fits(cfg)
    if cfg.reward:
        fetch_reward(cfg.reward)  # likewise the ground-truth reward's classifier, if it comes from the hub
    rank, world, device, mesh = setup_distributed(cfg)
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size, world)
    log = log_on_rank0(rank)
    on_rank0(lock_run_dir, device, f"lock {cfg.out_dir}", cfg.out_dir, log)  # before anything is written
    on_rank0(check_writable, device, f"write to {cfg.out_dir}", cfg.out_dir)
    check_shared_out_dir(cfg.out_dir, device)
    log(f"data: {json.dumps(counts)}")

    if cfg.sft_steps and cfg.objective == "dpo":
        state = warm_start(cfg, train_pairs, data_sha256, rank, world, device, mesh, log)
    else:
        state = build_training_state(cfg, rank, device, mesh)
    log(f"model: {state.policy.num_params() / 1e6:.1f}M parameters, {world} rank(s), sharding={cfg.sharding}, "
        f"precision={cfg.precision}, device={device.type}"
        + (f", reference in {reference_precision_name(cfg)}"
           if state.reference is not None and reference_precision_name(cfg) != cfg.precision else ""))
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    identity = run_identity(cfg, data_sha256, state.weights_sha256)
    step = start_or_resume(cfg, identity, state, device, log, last_step)
    if step is None:
        return
    metrics_log = MetricsLog(cfg, device)  # W&B starts once the run directory is this run's

    reference_logps = reference_eval_logps = None
    if cfg.precompute_reference and cfg.objective == "dpo" and not cfg.reference_free:
        log("precomputing reference log-probs")
        reference_logps, reference_eval_logps = precompute_reference_logps(
            state.reference, train_pairs, eval_pairs, cfg, rank, world, device, identity)
        state.reference = None  # freed: the reference model is not held during training
    sample_prompts = sample_prompts_of(eval_pairs, cfg)
    if sample_prompts and step == 0:  # the policy still equals the reference here
        before, before_rewards = sample_texts(state.policy, sample_prompts, cfg, device)
        on_rank0(write_samples_before, device, "write samples.md", cfg, sample_prompts, before, before_rewards)
    if step == 0 and eval_pairs:  # the starting point of the eval curves (rewards are all 0 here)
        line = metrics_log.record(step, evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                                 cfg, rank, world, device))
        log(format_log_line("eval", line))

    log(f"training: {last_step - step} steps of {cfg.batch_size} pairs ({steps_per_epoch} steps per epoch)")
    t_start, step_start, window_tokens, t_window, bad_steps = time.time(), step, 0, time.time(), 0
    while step < last_step:
        step_input = assemble_step(step, train_pairs, cfg, rank, world, device, reference_logps)
        window_tokens += step_input.n_tokens
        metrics, grad_norm, applied, stop_signal = train_step(
            state.policy, state.reference, state.optimizer, step_input.micro_batches, cfg,
            lr_at(step, total_steps, cfg), state.scaler, step_input.reference_logps, stop_requests)
        if not applied:
            bad_steps = count_bad_step(step, metrics, grad_norm, step_input, state.scaler, bad_steps, cfg, log)
        step += 1
        if step % cfg.log_every == 0 or step == last_step:
            values, tokens = reduce_across_ranks(metrics, grad_norm, window_tokens, world, device)
            now = time.time()
            values |= {"lr": lr_at(step - 1, total_steps, cfg), "tokens_per_s": tokens / (now - t_window),
                       "epoch": step / steps_per_epoch}  # fractional, as TRL's
            metrics_log.record(step, values)
            eta_s = (now - t_start) / (step - step_start) * (last_step - step)
            log(format_log_line(f"step {step}/{last_step}", values, device, eta_s))
            window_tokens, t_window = 0, now
        if cfg.eval_every and step % cfg.eval_every == 0 and step != last_step:
            line = metrics_log.record(step, evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                                     cfg, rank, world, device))
            log(format_log_line("eval", line))
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != last_step:
            save(cfg, state, step, steps_per_epoch, identity, device)
        if step != last_step and stop_signal:  # received before this step's check, on any rank
            stop_after_signal(cfg, state, step, steps_per_epoch, identity, device, stop_signal)

    line = metrics_log.record(step, evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                             cfg, rank, world, device))
    log(format_log_line("final eval", line))
    save(cfg, state, step, steps_per_epoch, identity, device)
    if sample_prompts:
        after, after_rewards = sample_texts(state.policy, sample_prompts, cfg, device)
        on_rank0(write_samples_table, device, "write samples.md", cfg, sample_prompts, after, log, after_rewards)
    export(cfg, state, device, log, line, counts, sys.argv[1:] if argv is None else argv)
    metrics_log.close()
    dist.barrier()


def export(cfg, state, device, log, final_metrics, counts, argv):
    """Collective: the trained policy as out_dir/final/, a Hugging Face model folder (weights, config,
    GPT-2's tokenizer, generation config, model card; export.py), rank 0 writing."""
    final = os.path.join(cfg.out_dir, "final")
    full = get_model_state_dict(state.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    on_rank0(write_export, device, f"export {final}", final, state.config, full, cfg, final_metrics, counts,
             training_command(argv))
    log(f"exported {final} (a transformers model folder with its tokenizer and model card); metrics in "
        f"{os.path.join(cfg.out_dir, 'metrics.jsonl')}")


def run(argv=None) -> int:
    """The error boundary. Bad input (a config value, a data file, weights, a checkpoint, a run
    directory in use): one line that names what and where, exit 2. A run stopped on purpose
    (non-finite losses or weights): one line, exit 1. SIGTERM/SIGINT: a checkpoint, one line, exit
    128 + the signal. Anything else is a bug or a failure of the machine: it propagates with its
    traceback (exit 1). On every path the process group is destroyed after main's FSDP state is
    freed, the run directory's lock released and the signal handlers restored."""
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    stop_requests = StopRequests()
    stop_requests.install()
    try:
        main(argv, stop_requests)
        return 0
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        unlock_run_dirs()
        stop_requests.restore()


if __name__ == "__main__":
    sys.exit(run())
