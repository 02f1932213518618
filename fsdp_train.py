"""DPO (and SFT) training of GPT-2 with FSDP2.

    python fsdp_train.py --config_file config/demo.yaml                      # one process
    torchrun --nproc_per_node 8 fsdp_train.py --config_file config/gpt2_xl_hf.yaml
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint HOST:29500 fsdp_train.py ...

Read top to bottom: data, distributed set-up, parallelize (the one place FSDP, activation
checkpointing and compile touch the model), the training step, evaluation and samples, main loop.
Launching the same command again on an out_dir with a complete checkpoint resumes from it.
"""
import dataclasses
import json
import math
import os
import resource
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import broadcast_json, on_rank0
from data.batches import epoch_order, grouped_epoch_order, pairs_of, rank_slice, split_groups, truncate_groups
from data.formats import load_preferences
from data.tokenizer import decode
from dpo import concatenated_logps, preference_loss, preference_metrics, response_logps
from evaluation import collate, evaluate, logps_average, map_pairs, pair_logps, sample_texts, samples_table, to_device
from gpt2 import GPT, GPTConfig, read_hf_config, read_hf_state_dict, resolve_checkpoint_dir, write_hf_checkpoint
from train_config import ConfigError, TrainConfig, dump_config, parse_args

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Keys that fix a run's trajectory: a checkpoint is only resumed by a run that agrees on all of them.
RUN_IDENTITY_KEYS = ("init_from", "n_layer", "n_head", "n_embd", "n_positions", "dataset", "data_path",
                     "max_records", "max_prompt_len", "max_len", "eval_fraction", "objective", "loss_type",
                     "beta", "label_smoothing", "reference_free", "logps", "lr", "weight_decay", "adam_beta1",
                     "adam_beta2", "warmup_steps", "lr_schedule", "grad_clip", "batch_size", "epochs", "seed",
                     "precision", "reference_precision", "group_order")


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig):
    """Files -> (train pairs, eval pairs, counts). Runs before any process group or GPU work, so
    bad data stops the run before anything is written."""
    groups, counts = load_preferences(cfg.dataset, cfg.data_path, **(
        {"max_records": cfg.max_records or None} if cfg.dataset == "lm_human_preferences" else {}))
    groups, counts["dropped_truncated_empty"] = truncate_groups(groups, cfg.max_prompt_len, cfg.max_len)
    train_groups, eval_groups = split_groups(groups, cfg.eval_fraction, cfg.seed)
    train_pairs, eval_pairs = pairs_of(train_groups), pairs_of(eval_groups)
    counts |= {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(f"{len(train_pairs)} training pairs is fewer than batch_size={cfg.batch_size}")
    return train_pairs, eval_pairs, counts


# ----------------------------------------------------------------------------- distributed

def setup_distributed(cfg: TrainConfig):
    """nccl on CUDA, gloo on CPU. Under torchrun the env:// rendezvous; as a plain `python` a
    one-process group, so the code below has one path for every world size."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch.cuda.is_available() is False")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world = dist.get_world_size()
    if cfg.sharding == "none" and world > 1:
        raise ConfigError(f"sharding=none runs without FSDP and needs one process, got world size {world}")
    if cfg.sharding == "none" and cfg.precision != "fp32":
        raise ConfigError(f"sharding=none trains in fp32 only: mixed precision ({cfg.precision}) comes from FSDP's "
                          "MixedPrecisionPolicy. Use sharding=full, which also runs as one process")
    mesh = None
    if cfg.sharding == "hybrid":  # (replicate across nodes, shard within a node)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    elif cfg.sharding == "full":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return dist.get_rank(), world, device, mesh


def parallelize(model: GPT, cfg: TrainConfig, mesh, param_dtype, trainable: bool):
    """Activation checkpointing -> compile -> fully_shard per block -> fully_shard the root.

    Each block is its own FSDP unit: its parameters are all-gathered just before it runs and freed
    after, so at most about one block is unsharded at a time. The root unit holds wte (tied with
    lm_head: one parameter, gathered once), wpe and ln_f. Mixed precision keeps fp32 master weights
    and reduces gradients in fp32 while compute runs in bf16/fp16. A frozen reference is stored
    directly in the compute dtype instead (it has no master weights to keep).
    """
    if trainable and param_dtype != torch.float32:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    if cfg.compile:
        # Every block shares Block.forward's compile cache, which holds one graph per variant: policy
        # with grad / policy in eval / frozen reference, each with and without the last block's `keep`,
        # static then dynamic shapes: about a dozen. Past dynamo's default of 8 it would silently run
        # the rest eagerly. (Newer torch calls it recompile_limit; cache_size_limit works from 2.6 on.)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for i, block in enumerate(model.transformer.h):
        if cfg.activation_checkpointing and trainable:
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # non-reentrant; no dropout, no RNG
        if cfg.compile:
            block.compile()
        if mesh is not None:  # sharding=none: a plain module (the single-process baseline of the tests)
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
        model.transformer.h[i] = block
    if mesh is None:
        return model
    # FSDP keeps the root's parameters (wte, wpe, ln_f) gathered after forward, since backward needs
    # them next. The frozen reference has no backward: reshard them, or they stay whole on every rank.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, **({} if trainable else {"reshard_after_forward": True}))
    return model


def initial_weights(cfg: TrainConfig, rank: int, device):
    """(GPTConfig, full state dict on rank 0 / None elsewhere). Only rank 0 reads the weights;
    set_model_state_dict then broadcasts them tensor by tensor into every rank's shards, so no
    other rank ever holds a full copy."""
    config_dict, state_dict = None, None
    if rank == 0:
        if cfg.init_from == "scratch":
            config = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions)
            state_dict = GPT(config).init_weights(seed=cfg.seed).state_dict()
        else:
            path = resolve_checkpoint_dir(cfg.init_from)
            config = read_hf_config(path)
            state_dict = read_hf_state_dict(path, config)
            state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
        config_dict = dataclasses.asdict(config)
    config = GPTConfig(**broadcast_json(config_dict, device))
    return config, state_dict


def reference_precision_name(cfg: TrainConfig) -> str:
    """The reference model's precision, "same" resolved: "fp32" under precision=fp32 either way."""
    return cfg.precision if cfg.reference_precision == "same" else cfg.reference_precision


def reference_dtype(cfg: TrainConfig):
    return DTYPES[reference_precision_name(cfg)]


def build_model(config, state_dict, cfg, mesh, device, trainable: bool):
    compute_dtype = DTYPES[cfg.precision] if trainable else reference_dtype(cfg)
    with torch.device("meta"):  # no memory until the weights arrive
        model = GPT(config)
    if not trainable:
        model = model.to(compute_dtype).requires_grad_(False)
    if mesh is None:  # one process, no FSDP: load, then wrap (checkpointing renames the blocks' keys)
        model.to_empty(device=device)
        model.load_state_dict(state_dict)
        model.lm_head.weight = model.transformer.wte.weight  # to_empty untied them; tie again
        return parallelize(model, cfg, mesh, compute_dtype, trainable).train(trainable)
    model = parallelize(model, cfg, mesh, compute_dtype, trainable)
    model.to_empty(device=device)
    set_model_state_dict(model, dict(state_dict) if dist.get_rank() == 0 else {},  # it rewrites the dict it gets
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train(trainable)


def make_optimizer(model, cfg):
    """AdamW; weight decay only on >= 2-D weights (matrices and embeddings), not biases or norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, without the foreach path's per-step temporaries (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)


def lr_at(step, total_steps, cfg):
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


class LossScaler:
    """Dynamic loss scaling for fp16. The overflow check is the global gradient norm, which
    clip_grad_norm_ all-reduces over every shard, so all ranks skip or step together."""

    def __init__(self, enabled, scale=2.0 ** 16, growth_interval=2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, scale if enabled else 1.0, growth_interval, 0
        self.min_scale = 1.0

    def update(self, finite):
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2
        else:
            self.scale, self.good_steps = max(self.scale / 2, self.min_scale), 0


# ----------------------------------------------------------------------------- the training step

def batch_loss(policy, reference, batch, cfg, reference_logps=None):
    """Mean loss and metrics of one micro-batch (collate() output, plus "index" for the precomputed
    reference). One forward over chosen+rejected for the policy, one for the reference."""
    average = logps_average(cfg)
    if cfg.objective == "sft":  # negative log-likelihood per chosen-response token
        n_pairs = batch["input_ids"].size(0) // 2
        chosen_mask = batch["response_mask"][:n_pairs]
        chosen_logps = response_logps(policy, batch["input_ids"][:n_pairs], chosen_mask)
        loss = -chosen_logps.sum() / chosen_mask.sum()
        return loss, {"loss": loss.detach(), "logps/chosen": chosen_logps.detach().mean()}
    policy_chosen, policy_rejected = concatenated_logps(policy, batch, average=average)
    if cfg.reference_free:
        reference_chosen = reference_rejected = None
    elif reference_logps is not None:
        reference_chosen, reference_rejected = reference_logps[batch["index"]].unbind(-1)
    else:
        with torch.no_grad():
            reference_chosen, reference_rejected = concatenated_logps(reference, batch, average=average)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=cfg.beta,
        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, reference_free=cfg.reference_free)
    metrics = preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    return losses.mean(), metrics


def train_step(policy, reference, optimizer, micro_batches, cfg, lr, scaler, reference_logps=None):
    """One optimizer step over this rank's micro-batches. Returns (metrics, grad_norm, applied).

    Each micro-batch's loss is divided by their number, so the gradient is the mean over the rank's
    pairs; FSDP's reduce-scatter then averages over ranks: the mean over the global batch. A step
    whose loss or global gradient norm is not finite is not applied.
    """
    n_micro = len(micro_batches)
    summed = {}
    for i, batch in enumerate(micro_batches):
        # Reduce-scatter once, after the last micro-batch; in between, FSDP keeps the blocks' unsharded
        # gradients (more memory, 1/n_micro the gradient traffic).
        if hasattr(policy, "set_requires_gradient_sync"):
            policy.set_requires_gradient_sync(i == n_micro - 1)
        loss, metrics = batch_loss(policy, reference, batch, cfg, reference_logps)
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
    finite_flag = (torch.isfinite(grad_norm) & torch.isfinite(summed["loss"])).float().reshape(1)
    dist.all_reduce(finite_flag, op=dist.ReduceOp.MIN)
    finite = bool(finite_flag.item())  # one host sync per step
    if finite:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scaler.update(finite)
    return summed, grad_norm, finite


# ----------------------------------------------------------------------------- run directory

def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def writable_problem(out_dir) -> str | None:
    """Why the run directory can't be written, found before training rather than at the first
    checkpoint; None when it can."""
    probe = os.path.join(out_dir, ".write_test")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        return f"out_dir {out_dir!r} is not writable ({err})"
    return None


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def precompute_reference_logps(reference, train_pairs, eval_pairs, cfg, rank, world, device, identity):
    """Reference log-probs of every pair, cached in out_dir/reference_logps.safetensors.
    The cache is reused only when its fingerprint (the run identity) matches."""
    path = os.path.join(cfg.out_dir, "reference_logps.safetensors")
    fingerprint = json.dumps(identity, sort_keys=True)
    if os.path.isfile(path):
        cached = load_file(path, device=str(device))
        with open(path + ".json") as f:
            if f.read() == fingerprint:
                return cached["train"], cached["eval"]
    train = map_pairs(train_pairs, pair_logps(reference, cfg), cfg, rank, world, device)
    evals = (map_pairs(eval_pairs, pair_logps(reference, cfg), cfg, rank, world, device) if eval_pairs
             else torch.zeros(0, 2, device=device))
    def write():
        save_file({"train": train.cpu(), "eval": evals.cpu()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        write_atomic(path + ".json", fingerprint)
    on_rank0(write, device, f"write {path}")
    return train, evals


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = parse_args(argv)
    train_pairs, eval_pairs, counts = load_data(cfg)  # before any process group, GPU or file work
    rank, world, device, mesh = setup_distributed(cfg)
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x world size ({world})")
    log = print if rank == 0 else (lambda *a, **k: None)
    problem = broadcast_json(writable_problem(cfg.out_dir) if rank == 0 else None, device)
    if problem:  # every rank raises, none is left waiting in a collective
        raise ConfigError(problem)
    log(f"data: {json.dumps(counts)}")

    identity = {k: getattr(cfg, k) for k in RUN_IDENTITY_KEYS}
    identity["reference_precision"] = reference_precision_name(cfg)  # "same" and its dtype are one run
    checkpoints = checkpoint.complete_checkpoints(cfg.out_dir)
    if checkpoints:
        with open(os.path.join(checkpoints[-1][1], "train_state.json")) as f:
            saved_identity = json.load(f)["identity"]
        # checkpoints from before reference_precision existed kept the reference in the training precision
        saved_identity.setdefault("reference_precision", saved_identity.get("precision"))
        checkpoint.check_compatible(checkpoints[-1][1], saved_identity, identity)

    config, full_state = initial_weights(cfg, rank, device)
    policy = build_model(config, full_state, cfg, mesh, device, trainable=True)
    needs_reference = cfg.objective == "dpo" and not cfg.reference_free
    reference = build_model(config, full_state, cfg, mesh, device, trainable=False) if needs_reference else None
    del full_state
    optimizer = make_optimizer(policy, cfg)
    scaler = LossScaler(enabled=cfg.precision == "fp16")
    log(f"model: {policy.num_params() / 1e6:.1f}M parameters, {world} rank(s), sharding={cfg.sharding}, "
        f"precision={cfg.precision}, device={device.type}"
        + (f", reference in {reference_precision_name(cfg)}"
           if reference is not None and reference_precision_name(cfg) != cfg.precision else ""))

    steps_per_epoch = len(train_pairs) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    step, bad_steps = 0, 0
    if checkpoints:
        on_rank0(lambda: checkpoint.remove_partial_checkpoints(cfg.out_dir, log), device, "clean up checkpoints")
        problem = broadcast_json(checkpoint.verify_files(checkpoints[-1][1]) if rank == 0 else None, device)
        if problem:  # all ranks raise together (a lone rank raising would leave the others waiting)
            raise ValueError(f"cannot resume: {problem}. Move the checkpoint away to resume from an older "
                             "one, or use another out_dir.")
        train_state = checkpoint.load_checkpoint(checkpoints[-1][1], policy, optimizer)
        step, scaler.scale, scaler.good_steps = train_state["step"], train_state["loss_scale"], train_state["good_steps"]
        log(f"resumed from {checkpoints[-1][1]} at step {step}")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    def prepare_run_dir():
        if not checkpoints:  # a fresh start: nothing from an earlier attempt counts
            checkpoint.remove_partial_checkpoints(cfg.out_dir, log)
            if os.path.exists(metrics_path):
                os.remove(metrics_path)
        write_atomic(os.path.join(cfg.out_dir, "config.yaml"), dump_config(cfg))
        if os.path.exists(metrics_path):  # drop lines from beyond the checkpoint we resumed from
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
            write_atomic(metrics_path, "".join(kept))
    on_rank0(prepare_run_dir, device, f"prepare {cfg.out_dir}")
    wandb_run = None
    if cfg.wandb_log and rank == 0:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("--wandb_log needs Weights & Biases: pip install wandb") from err
        wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.out_dir)

    reference_logps = reference_eval_logps = None
    if cfg.precompute_reference and needs_reference:
        log("precomputing reference log-probs")
        reference_logps, reference_eval_logps = precompute_reference_logps(
            reference, train_pairs, eval_pairs, cfg, rank, world, device, identity)
        reference = None  # freed: the reference model is not held during training

    sample_prompts = [p.prompt for p in eval_pairs[:: max(1, len(eval_pairs) // max(1, cfg.n_samples))]][:cfg.n_samples]
    before_path = os.path.join(cfg.out_dir, "samples_before.json")
    if sample_prompts and step == 0:  # the policy still equals the reference here
        before = sample_texts(policy, sample_prompts, cfg, device)

        def write_before():
            write_atomic(before_path, json.dumps(before))
            write_atomic(os.path.join(cfg.out_dir, "samples.md"),
                         samples_table([decode(p) for p in sample_prompts], before, ["(training)"] * len(before)))
        on_rank0(write_before, device, "write samples.md")

    def record(metrics):
        line = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}

        def append():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        on_rank0(append, device, f"append to {metrics_path}")
        if wandb_run is not None:
            wandb_run.log(line, step=step)
        return line

    def save(step):
        checkpoint.save_checkpoint(cfg.out_dir, step, policy, optimizer, {
            "step": step, "loss_scale": scaler.scale, "good_steps": scaler.good_steps, "epoch": step // steps_per_epoch,
            "pairs_seen": step * cfg.batch_size, "identity": identity}, cfg.keep_checkpoints, device)

    if step == 0 and eval_pairs:  # the starting point of the eval curves (rewards are all 0 here)
        line = record(evaluate(policy, reference, eval_pairs, reference_eval_logps, cfg, rank, world, device, step))
        log("eval | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in line.items() if k != "step"))
    log(f"training: {last_step - step} steps of {cfg.batch_size} pairs ({steps_per_epoch} steps per epoch)")
    t_start, step_start, window_tokens, t_window = time.time(), step, 0, time.time()
    while step < last_step:
        epoch, position = divmod(step, steps_per_epoch)
        order = (grouped_epoch_order(train_pairs, cfg.seed, epoch) if cfg.group_order
                 else epoch_order(len(train_pairs), cfg.seed, epoch))
        global_batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
        local = rank_slice(global_batch, rank, world)
        micro_batches = []
        for start in range(0, len(local), cfg.micro_batch_size):
            indices = local[start:start + cfg.micro_batch_size]
            pairs = [train_pairs[i] for i in indices]
            batch = collate(pairs, cfg)
            batch["index"] = torch.tensor(indices)
            # tokens of the chosen and the rejected sequence, counted as if run separately
            window_tokens += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
            micro_batches.append(to_device(batch, device))
        metrics, grad_norm, applied = train_step(policy, reference, optimizer, micro_batches, cfg,
                                                 lr_at(step, total_steps, cfg), scaler, reference_logps)
        # fp16 overflows are routine (the scaler halves its scale and retries on the next batch); a
        # non-finite step at the smallest scale is a real one, as is any in bf16/fp32.
        if not applied and (not scaler.enabled or scaler.scale <= scaler.min_scale):
            bad_steps += 1
            log(f"step {step + 1}: non-finite loss ({float(metrics['loss']):.4g}) or gradient norm "
                f"({float(grad_norm):.4g}) on pairs {global_batch[:8]}{'...' if len(global_batch) > 8 else ''} "
                f"(epoch {epoch}); the update was not applied ({bad_steps} such step(s), max_bad_steps="
                f"{cfg.max_bad_steps})")
            if bad_steps > cfg.max_bad_steps:
                ckpts = checkpoint.complete_checkpoints(cfg.out_dir)
                raise RuntimeError(f"stopping at step {step + 1}: non-finite loss or gradient norm. Last good "
                                   f"checkpoint: {ckpts[-1][1] if ckpts else 'none'}")
        step += 1
        if step % cfg.log_every == 0 or step == last_step:
            names = sorted(metrics)
            stacked = torch.stack([metrics[k].float() for k in names] + [torch.tensor(float(window_tokens), device=device)])
            dist.all_reduce(stacked)  # sums: the metrics are then averaged over ranks, the tokens not
            values = dict(zip(names, (stacked[:-1] / world).tolist()))
            values["grad_norm"] = float(grad_norm)
            now = time.time()
            tokens_per_s = stacked[-1].item() / (now - t_window)
            eta = (now - t_start) / (step - step_start) * (last_step - step)
            record(values | {"lr": lr_at(step - 1, total_steps, cfg), "tokens_per_s": tokens_per_s})
            log(f"step {step}/{last_step} | loss {values['loss']:.4f}"
                + (f" | acc {values['rewards/accuracies']:.2f} | margin {values['rewards/margins']:.3f}"
                   if "rewards/margins" in values else "")
                + f" | norm {values['grad_norm']:.2f} | lr {lr_at(step - 1, total_steps, cfg):.2e}"
                f" | {tokens_per_s:,.0f} tok/s | mem {peak_memory_gib(device):.2f} GiB"
                f" | eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            window_tokens, t_window = 0, now
        if cfg.eval_every and step % cfg.eval_every == 0 and step != last_step:
            eval_metrics = evaluate(policy, reference, eval_pairs, reference_eval_logps, cfg, rank, world, device, step)
            line = record(eval_metrics)
            log("eval | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in line.items() if k != "step"))
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != last_step:
            save(step)

    eval_metrics = evaluate(policy, reference, eval_pairs, reference_eval_logps, cfg, rank, world, device, step)
    line = record(eval_metrics)
    log("final eval | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in line.items() if k != "step"))
    save(step)
    if sample_prompts:
        after = sample_texts(policy, sample_prompts, cfg, device)

        def write_samples():
            with open(before_path) as f:
                before = json.load(f)
            table = samples_table([decode(p) for p in sample_prompts], before, after)
            write_atomic(os.path.join(cfg.out_dir, "samples.md"), table)
            log("\n" + table)
        on_rank0(write_samples, device, "write samples.md")
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    on_rank0(lambda: write_hf_checkpoint(config, full, os.path.join(cfg.out_dir, "final")), device,
             f"export {os.path.join(cfg.out_dir, 'final')}")
    if rank == 0:
        log(f"exported {os.path.join(cfg.out_dir, 'final')} (transformers layout); metrics in "
            f"{os.path.join(cfg.out_dir, 'metrics.jsonl')}")
    if wandb_run is not None:
        wandb_run.finish()
    dist.barrier()


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        main()  # returns with its models, optimizer and FSDP state already freed
    except (ConfigError, FileNotFoundError, ValueError) as err:  # bad input: say what and where, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, OSError) as err:  # stopped during the run (non-finite loss, disk full, ...)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():  # after main's FSDP modules are gone, which hold its groups
            dist.destroy_process_group()
