"""Distributed set-up, applied from outside the model: the process group, FSDP2 per block, the
weights broadcast from rank 0, and the training state (policy, frozen reference, optimizer).

Used by fsdp_train.py and by the benchmarks (bench/throughput.py, bench/group_packing.py,
bench/memory_estimate.py), so the models they time are the trainer's own.
"""
import dataclasses
import gc
import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from errors import ConfigError
from gpt2 import GPT, GPTConfig, SCORE_HEAD, TIED_HEAD, TIED_TO, read_hf_config, read_hf_state_dict, resolve_checkpoint_dir
from train.config import TrainConfig, check_positions, check_sharding, reference_precision_name
from train.optim import LossScaler, make_optimizer
from train.rank0 import on_rank0

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- process group

def resolve_device(name: str) -> torch.device:
    """The device every command means by cpu, cuda (or cuda:N) or auto (cuda when available)."""
    if name not in ("auto", "cpu") and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch.cuda.is_available() is False")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_distributed(cfg: TrainConfig):
    """(rank, world size, device, mesh). nccl on CUDA, gloo on CPU. Under torchrun the env://
    rendezvous; as a plain `python` a one-process group, so the code has one path for every world
    size. mesh is None for sharding=none (a plain module, one process)."""
    use_cuda = resolve_device(cfg.device).type == "cuda"
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
    check_sharding(cfg, world)
    mesh = None
    if cfg.sharding == "hybrid":  # (replicate across nodes, shard within a node)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    elif cfg.sharding == "full":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return dist.get_rank(), world, device, mesh


def end_process_group():
    """Destroy the process group so that it ends here, its gloo/NCCL threads joined: the FSDP modules
    live in reference cycles (their hooks hold them) and through their DTensors hold the mesh and the
    group, so they are collected first. Left to the interpreter's exit, a gloo thread still finishing
    the last collective's work needed the GIL during finalisation, and a rank of a finished run died
    with SIGABRT ("terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- models

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
    """(GPTConfig, full state dict on rank 0 / None elsewhere, the weights' sha256). Only rank 0
    reads the weights; set_model_state_dict then broadcasts them tensor by tensor into every rank's
    shards, so no other rank ever holds a full copy."""
    state_dict = {}  # filled on rank 0
    read = on_rank0(read_weights_into, device, f"read the weights of {cfg.init_from!r}", cfg, state_dict)
    return GPTConfig(**read["config"]), (state_dict if rank == 0 else None), read["weights_sha256"]


def check_model_fits(cfg: TrainConfig):
    """Every rank, before the process group exists and anything is written: fetch init_from (a hub
    download lands in the cache here) and check that its positions hold the run's sequences
    (config.json only; rank 0 reads the weights later)."""
    if cfg.init_from != "scratch":
        path = resolve_checkpoint_dir(cfg.init_from)
        check_positions(cfg, read_hf_config(path).n_positions, os.path.join(path, "config.json"))


def read_weights_into(cfg: TrainConfig, state_dict: dict) -> dict:
    """Rank 0: fill state_dict with the starting weights; return the GPTConfig as a dict and the
    weights' fingerprint (both are sent to the other ranks)."""
    if cfg.init_from == "scratch":
        config = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions)
        with torch.device("meta"):  # initialised once, by init_weights (not first by nn.Linear's defaults)
            model = GPT(config)
        model.to_empty(device="cpu")
        state_dict.update(model.init_weights(seed=cfg.seed).state_dict())
    else:
        path = resolve_checkpoint_dir(cfg.init_from)
        config = read_hf_config(path)
        state_dict.update(read_hf_state_dict(path, config))
        state_dict[TIED_HEAD] = state_dict[TIED_TO]
    if has_score_head(cfg):
        state_dict[SCORE_HEAD] = initial_score_head(config.n_embd, cfg.seed)
    return {"config": dataclasses.asdict(config), "weights_sha256": weights_fingerprint(state_dict)}


def has_score_head(cfg: TrainConfig) -> bool:
    """The policy carries GPT's scalar head: the reward model's score, PPO's value head (ppo_train.py)."""
    return cfg.objective in ("reward_model", "ppo")


def initial_score_head(n_embd: int, seed: int):
    """(1, n_embd) ~ N(0, 1 / (n_embd + 1)), Stiennon et al. 2020's initialisation of the reward head
    (their App. C), seeded: the same starting weights on every launch of the run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_embd, generator=generator) / math.sqrt(n_embd + 1)


def weights_fingerprint(state_dict: dict) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order: the starting weights
    themselves, wherever they were read from (about 2 s per GB)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def build_model(config, state_dict, cfg, mesh, device, trainable: bool):
    """A GPT on `device` holding state_dict (rank 0's; broadcast into every rank's shards), parallelized.
    trainable=False gives the frozen reference, in reference_precision, without gradients."""
    compute_dtype = DTYPES[cfg.precision] if trainable else DTYPES[reference_precision_name(cfg)]
    score_head = trainable and has_score_head(cfg)
    if state_dict is not None and not score_head:  # the reference: a language model only
        state_dict = {k: v for k, v in state_dict.items() if k != SCORE_HEAD}
    with torch.device("meta"):  # no memory until the weights arrive
        model = GPT(config, score_head=score_head)
    model.head_precision = cfg.lm_head_precision
    if not trainable:
        model = model.to(compute_dtype).requires_grad_(False)
    if mesh is None:  # one process, no FSDP: load, then wrap (checkpointing renames the blocks' keys)
        model.to_empty(device=device)
        model.load_state_dict(state_dict)
        return parallelize(model, cfg, mesh, compute_dtype, trainable).train(trainable)
    model = parallelize(model, cfg, mesh, compute_dtype, trainable)
    model.to_empty(device=device)
    set_model_state_dict(model, dict(state_dict) if dist.get_rank() == 0 else {},  # it rewrites the dict it gets
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train(trainable)


@dataclass
class TrainingState:
    config: GPTConfig
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None without a live reference (sft, reference_free)
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    weights_sha256: str  # of the starting weights: part of the run's identity and the reference cache's key
    extra: dict = dataclasses.field(default_factory=dict)  # what a job's checkpoints keep besides the tensors and
    #                                                        the step (PPO's KL coefficient and score statistics)


def needs_reference_model(cfg: TrainConfig) -> bool:
    """DPO's frozen reference, and PPO's (its KL penalty); for SFT and unlikelihood with kl_samples > 0,
    the starting weights that eval/kl is measured against (kl_samples: 0 trains them without that
    copy). A reward model samples nothing and has none."""
    if cfg.objective == "reward_model":
        return False
    if cfg.objective == "ppo":
        return True
    return (cfg.objective == "dpo" and not cfg.reference_free) or (cfg.objective != "dpo" and cfg.kl_samples > 0)


def build_training_state(cfg: TrainConfig, rank: int, device, mesh) -> TrainingState:
    """Policy and frozen reference from the same starting weights, AdamW, the loss scaler."""
    config, full_state, weights_sha256 = initial_weights(cfg, rank, device)
    policy = build_model(config, full_state, cfg, mesh, device, trainable=True)
    reference = build_model(config, full_state, cfg, mesh, device, trainable=False) if needs_reference_model(cfg) else None
    del full_state
    return TrainingState(config, policy, reference, make_optimizer(policy, cfg),
                         LossScaler(enabled=cfg.precision == "fp16"), weights_sha256)
