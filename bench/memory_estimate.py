"""Per-GPU memory of one DPO training step, estimated on CPU: the four GPT-2 presets, as their configs run.

    python bench/memory_estimate.py                                   # config/gpt2_{small,...,xl}_hf.yaml
    python bench/memory_estimate.py --configs config/gpt2_xl_hf.yaml --gpu_gib 80 --headroom 0.25
    python bench/memory_estimate.py --world_size 8 --json estimate.json

An ESTIMATE, not a GPU measurement. What the trainer holds on one GPU (distributed.build_training_state,
train.step.train_step), for P parameters, world size W and n micro-batches per step:

    policy weights   4P / W   fp32 master weights, sharded by FSDP2 (bf16 only per block, while it runs)
    gradients        4P / W   fp32 (MixedPrecisionPolicy reduce_dtype); with n > 1 micro-batches FSDP2
                              accumulates the UNSHARDED gradients in fp32 between them: 4P on every rank
    AdamW state      8P / W   exp_avg and exp_avg_sq, fp32
    reference        bP / W   the frozen copy in reference_precision (b = 2 for bf16); 0 with
                              precompute_reference or reference_free
    FSDP copies      all-gathered in the compute dtype: the policy's root (wte, wpe, ln_f), two blocks and one
                     block's gradients; the reference's root and two blocks during its forward
    activations      MEASURED: the bytes of the tensors that one policy forward saves for backward
                     (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters left out)
                     on a real forward + backward of the trainer's path (dpo.concatenated_logps on a batch
                     from data.batches.collate, checkpointing applied by distributed.parallelize) in the
                     run's compute dtype, on CPU, at the preset's true width. To stay cheap it runs 1 and
                     2 blocks on one and two layout units (a packed row) and scales: activations =
                     fixed + units * (last block, embeddings, LM-head rows + (n_layer - 1) * per block)
    transients       written from the code: the reference's forward (its fp32 logits and head-weight copy)
                     or the start of backward (the logits' fp32 gradient, a chunk of fp32 softmax or the
                     head copy's gradient, the root's gradient), each with one block's working set (two
                     with activation checkpointing: the block being recomputed)

    peak = weights + AdamW + reference + FSDP copies
           + max(activations + the larger transient + the gradients accumulated so far, the gradients)

The activations are all alive from the end of the policy's forward to the start of its backward; the
gradients grow as backward frees them, so the peak is at one end or the other. On CPU this matches the
tracked peak of the trainer's own step to 0.5-3.5% (--check_on_cpu: gpt2, gpt2-medium).
Not counted: the CUDA context and NCCL buffers (outside PyTorch's allocator), the caching allocator's
fragmentation, cuBLAS workspaces, evaluation and sampling (no-grad, smaller): --headroom is for them.
CPU's SDPA (flash kernel for CPU) saves q, k, v, the output, the logsumexp and the mask as a float
bias, as CUDA's memory-efficient kernel (the one masked attention takes on GPUs here) does.

A micro-batch of m pairs is counted in layout units: with prefix_sharing and group_order, a unit is one
packed row [prompt | k+1 responses] for a prompt's k pairs (lm_human_preferences: the best of 4 samples
against each of the 3 others, 64 + 4 x 24 = 160 positions), and m consecutive pairs of the grouped order
touch at most ceil((m - 1) / k) + 1 prompts; otherwise a unit is one pair ([prompt | chosen | rejected],
or two rows without prefix_sharing). Rows are as long as max_len allows: an upper bound.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from data.batches import Pair, collate  # noqa: E402
from dpo import LOGSUMEXP_CHUNK, concatenated_logps  # noqa: E402
from gpt2 import EOT_ID, GPT, GPTConfig, PRESETS  # noqa: E402
from train import config as train_config, distributed  # noqa: E402

CONFIGS = [os.path.join(ROOT, "config", f"gpt2_{size}_hf.yaml") for size in ("small", "medium", "large", "xl")]
GIB = 2 ** 30


# ----------------------------------------------------------------------------- the model and its state

def model_shape(cfg: train_config.TrainConfig) -> GPTConfig:
    """The GPT-2 shape a config trains: a preset name, or init_from=scratch's n_layer/n_head/n_embd."""
    name = cfg.init_from.removeprefix("openai-community/")
    if name in PRESETS:
        return GPTConfig.from_name(name)
    if cfg.init_from == "scratch":
        return GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions)
    raise SystemExit(f"memory_estimate: init_from={cfg.init_from!r} is neither a GPT-2 preset {list(PRESETS)} nor "
                     "'scratch'; give a config of one of those")


def n_params(config: GPTConfig) -> int:
    """Parameters of our GPT (the tied LM head counted once), built on the meta device: no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def state_bytes(cfg: train_config.TrainConfig, config: GPTConfig, world_size: int, n_micro: int) -> dict:
    """Bytes per GPU of the weights, gradients, AdamW state, reference and FSDP's all-gathered copies."""
    P, W = n_params(config), world_size
    compute = distributed.DTYPES[cfg.precision].itemsize
    has_reference = distributed.needs_reference_model(cfg) and not cfg.precompute_reference
    reference = distributed.DTYPES[train_config.reference_precision_name(cfg)].itemsize if has_reference else 0
    with torch.device("meta"):
        model = GPT(config)
    n_root = sum(p.numel() for m in (model.transformer.wte, model.transformer.wpe, model.transformer.ln_f)
                 for p in m.parameters())
    n_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return {
        "n_params": P,
        "param_bytes": 4 * P // W,  # fp32 master weights, every precision
        # between micro-batches FSDP2 keeps each parameter's unsharded gradient in fp32 (reduce_dtype)
        "grad_bytes": 4 * P if n_micro > 1 else 4 * P // W,
        "optimizer_bytes": 8 * P // W,  # AdamW: two fp32 moments
        "reference_param_bytes": reference * P // W,
        # all-gathered in the compute dtype while the policy runs: its root (kept for backward) and two
        # blocks (one running, one prefetched), and one block's unsharded gradients
        "fsdp_unsharded_bytes": compute * (n_root + 3 * n_block),
        # the reference's, during its forward only (freed after: reshard_after_forward)
        "reference_unsharded_bytes": reference * (n_root + 2 * n_block),
    }


# ----------------------------------------------------------------------------- the batch layout

def pairs_per_prompt_default(cfg: train_config.TrainConfig) -> int:
    """lm_human_preferences: the best of 4 samples against each of the 3 others; one pair a prompt otherwise."""
    return 3 if cfg.dataset == "lm_human_preferences" else 1


def packs_groups(cfg, pairs_per_prompt: int) -> bool:
    return cfg.prefix_sharing and cfg.group_order and pairs_per_prompt > 1


def units_per_micro_batch(cfg, micro_batch_size: int, pairs_per_prompt: int) -> int:
    """Layout units (see the module docstring) in a micro-batch of micro_batch_size pairs, at most."""
    if packs_groups(cfg, pairs_per_prompt):
        return min(micro_batch_size, math.ceil((micro_batch_size - 1) / pairs_per_prompt) + 1)
    return micro_batch_size


def unit_pairs(cfg, n_units: int, pairs_per_prompt: int, vocab_size: int = EOT_ID + 1) -> list[Pair]:
    """n_units layout units of random tokens at the config's longest lengths, as the trainer's Pairs."""
    P, R = cfg.max_prompt_len, cfg.max_len - cfg.max_prompt_len
    k = pairs_per_prompt if packs_groups(cfg, pairs_per_prompt) else 1
    generator = torch.Generator().manual_seed(0)

    def tokens(n):  # ordinary tokens, below the end-of-text id (the pad)
        return torch.randint(0, min(vocab_size - 1, EOT_ID), (n,), generator=generator).tolist()
    pairs = []
    for group in range(n_units):
        prompt, responses = tokens(P), [tokens(R) for _ in range(k + 1)]
        pairs += [Pair(prompt, responses[0], responses[j], group_index=group, chosen_index=0, rejected_index=j)
                  for j in range(1, k + 1)]
    return pairs


def worst_micro_batch(cfg, micro_batch_size: int, pairs_per_prompt: int, vocab_size: int = EOT_ID + 1) -> list[Pair]:
    """micro_batch_size consecutive pairs that touch as many prompts as units_per_micro_batch counts:
    the window starts at the last pair of a prompt."""
    units = units_per_micro_batch(cfg, micro_batch_size, pairs_per_prompt)
    start = pairs_per_prompt - 1 if packs_groups(cfg, pairs_per_prompt) and micro_batch_size > 1 else 0
    return unit_pairs(cfg, units + 1, pairs_per_prompt, vocab_size)[start:start + micro_batch_size]


# ----------------------------------------------------------------------------- activations, measured

def saved_tensor_bytes(config: GPTConfig, dtype, batch, checkpointing: bool, head_precision: str = "fp32") -> int:
    """Bytes that one policy forward (dpo.concatenated_logps) saves for backward: unique storages seen
    by saved_tensors_hooks, parameters left out. Then the backward runs, so the graph is a real one.

    Checkpointing is applied by distributed.parallelize, as the trainer does (no FSDP here: mesh None);
    a checkpointed block's inputs are saved through these hooks, its insides are recomputed."""
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    model.to_empty(device="cpu")  # GPT.to_empty ties the head again
    model.init_weights(seed=0)
    model.head_precision = head_precision  # as distributed.build_model sets it: fp32 saves an fp32 copy of the head
    model = distributed.parallelize(model, dataclasses.replace(train_config.TrainConfig(), compile=False,
                                                            activation_checkpointing=checkpointing),
                                 None, dtype, trainable=True)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage address -> bytes; a saved tensor stays alive until backward, so addresses are unique

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = concatenated_logps(model, batch)
    (logps.chosen - logps.rejected).sum().backward()
    return sum(saved.values())


def measure_activations(cfg, config: GPTConfig, pairs_per_prompt: int, checkpointing: bool) -> dict:
    """Saved bytes of 1 and 2 blocks on 1 and 2 layout units, at the true width, split into
    fixed + units * (first + (n_layer - 1) * per_block). The last block (the one whose MLP runs only on
    the LM-head rows) is in `first`; a second block adds a full one."""
    dtype = distributed.DTYPES[cfg.precision]
    one_block = dataclasses.replace(config, n_layer=1)
    two_blocks = dataclasses.replace(config, n_layer=2)
    one_unit = collate(unit_pairs(cfg, 1, pairs_per_prompt, config.vocab_size), share_prompt=cfg.prefix_sharing)
    two_units = collate(unit_pairs(cfg, 2, pairs_per_prompt, config.vocab_size), share_prompt=cfg.prefix_sharing)
    m11, m12, m21 = (saved_tensor_bytes(shape, dtype, batch, checkpointing, cfg.lm_head_precision)
                     for shape, batch in ((one_block, one_unit), (one_block, two_units), (two_blocks, one_unit)))
    first = m12 - m11
    return {"checkpointing": checkpointing, "dtype": str(dtype).removeprefix("torch."),
            "fixed_bytes": m11 - first,  # lm_head_precision=fp32 under bf16/fp16: the head weight's fp32 copy
            "first_block_bytes_per_unit": first, "per_block_bytes_per_unit": m21 - m11,
            "unit_positions": one_unit.input_ids.numel(), "unit_head_rows": one_unit.target_ids.numel()}


def activation_bytes(measured: dict, n_layer: int, units: int) -> int:
    return measured["fixed_bytes"] + units * (measured["first_block_bytes_per_unit"]
                                              + (n_layer - 1) * measured["per_block_bytes_per_unit"])


def transient_bytes(measured: dict, no_checkpointing: dict, config: GPTConfig, units: int, compute_bytes: int,
                    reference_unsharded_bytes: int) -> dict:
    """What exists on top of the saved activations at the two moments that hold all of them: the
    reference's forward (run after the policy's, under no_grad) and the start of the policy's backward.
    Written from the code (dpo._TokenLogps, gpt2.py's fp32 head, FSDP's root), not measured."""
    V, d = config.vocab_size, config.n_embd
    head_rows = units * measured["unit_head_rows"]
    n_root = V * d + config.n_positions * d + 2 * d  # wte (tied to the head), wpe, ln_f
    block = units * no_checkpointing["per_block_bytes_per_unit"]  # one block's working set, as much as it saves
    # its fp32 logits (N, V), the head weight's fp32 copy (V, d) unless it is fp32 already (counted for
    # bf16_in_fp32_out too: made on CPU, not on CUDA), its all-gathered root and blocks, one block's working set
    head_copy = 4 * V * d if compute_bytes < 4 else 0
    reference_forward = 4 * head_rows * V + head_copy + reference_unsharded_bytes + block
    # the logits' fp32 gradient (N, V); then one chunk of fp32 softmax, or after it the fp32 gradient of
    # the head weight's copy (V, d); the root's unsharded gradient (kept until the embedding's backward);
    # one block's working set, two with checkpointing (the block being recomputed holds its activations)
    backward = (4 * head_rows * V + max(4 * min(head_rows, LOGSUMEXP_CHUNK) * V, 4 * V * d)
                + compute_bytes * n_root + (2 if measured["checkpointing"] else 1) * block)
    return {"reference_forward_bytes": reference_forward, "backward_start_bytes": backward}


# ----------------------------------------------------------------------------- the estimate

def estimate(cfg, config: GPTConfig, micro_batch_size: int, checkpointing: bool, measured: dict,
             world_size: int = 1, pairs_per_prompt: int | None = None) -> dict:
    """Bytes per GPU of one DPO step at this micro-batch size. measured: {False: ..., True: ...} from
    measure_activations (without / with checkpointing).

    peak = weights + AdamW + reference + FSDP copies + the larger of
      - activations + the larger transient (transient_bytes) + the gradients that already exist then
        (the fp32 unsharded ones accumulated over earlier micro-batches; none with one micro-batch), and
      - the gradients at the end of backward (activations freed by then)."""
    k = pairs_per_prompt or pairs_per_prompt_default(cfg)
    units = units_per_micro_batch(cfg, micro_batch_size, k)
    row = {"micro_batch_size": micro_batch_size, "activation_checkpointing": checkpointing,
           "n_micro": cfg.batch_size // world_size // micro_batch_size, "units": units,
           "positions": units * measured[checkpointing]["unit_positions"],
           "head_rows": units * measured[checkpointing]["unit_head_rows"]}
    row |= state_bytes(cfg, config, world_size, row["n_micro"])
    row["activation_bytes"] = activation_bytes(measured[checkpointing], config.n_layer, units)
    row |= transient_bytes(measured[checkpointing], measured[False], config, units,
                           distributed.DTYPES[cfg.precision].itemsize, row["reference_unsharded_bytes"])
    accumulated = row["grad_bytes"] if row["n_micro"] > 1 else 0
    during_backward = (row["activation_bytes"] + max(row["reference_forward_bytes"], row["backward_start_bytes"])
                       + accumulated)
    row["peak_bytes"] = (row["param_bytes"] + row["optimizer_bytes"] + row["reference_param_bytes"]
                         + row["fsdp_unsharded_bytes"] + max(during_backward, row["grad_bytes"]))
    return row


def choose(rows: list[dict], usable_bytes: float) -> dict | None:
    """The largest micro-batch that fits (fewest micro-batches per step); at equal size, without
    activation checkpointing (no recomputed forward). None if nothing fits."""
    fitting = [r for r in rows if r["peak_bytes"] <= usable_bytes]
    return max(fitting, key=lambda r: (r["micro_batch_size"], not r["activation_checkpointing"]), default=None)


def micro_batch_sizes(batch_size: int, world_size: int) -> list[int]:
    """Every micro-batch size the trainer accepts: it divides each rank's batch_size / world_size pairs."""
    local = batch_size // world_size
    return [m for m in range(1, local + 1) if local % m == 0]


def estimate_config(path: str, args) -> dict:
    """The whole estimate for one config file: the measurements, a row per (micro-batch, checkpointing)."""
    cfg = train_config.parse_args(["--config_file", path, "--reward="])  # samples are not estimated: no reward package
    if cfg.objective != "dpo":
        raise SystemExit(f"memory_estimate: {path}: objective={cfg.objective}; this estimates DPO steps only")
    if cfg.batch_size % args.world_size:
        raise SystemExit(f"memory_estimate: {path}: batch_size {cfg.batch_size} does not split over "
                         f"--world_size {args.world_size}")
    config = model_shape(cfg)
    k = args.pairs_per_prompt or pairs_per_prompt_default(cfg)
    start = time.perf_counter()
    measured = {ac: measure_activations(cfg, config, k, ac) for ac in (False, True)}
    rows = [estimate(cfg, config, m, ac, measured, args.world_size, k)
            for m in micro_batch_sizes(cfg.batch_size, args.world_size) for ac in (False, True)]
    usable = args.gpu_gib * GIB * (1 - args.headroom)
    return {"config": os.path.relpath(path, ROOT), "init_from": cfg.init_from, "precision": cfg.precision,
            "reference_precision": train_config.reference_precision_name(cfg), "batch_size": cfg.batch_size,
            "configured_micro_batch_size": cfg.micro_batch_size,
            "configured_activation_checkpointing": cfg.activation_checkpointing,
            "max_prompt_len": cfg.max_prompt_len, "max_len": cfg.max_len, "prefix_sharing": cfg.prefix_sharing,
            "group_order": cfg.group_order, "pairs_per_prompt": k, "n_layer": config.n_layer,
            "n_embd": config.n_embd, "world_size": args.world_size, "gpu_gib": args.gpu_gib,
            "headroom": args.headroom, "usable_bytes": usable, "measured": measured,
            "measure_s": time.perf_counter() - start, "rows": rows, "choice": choose(rows, usable)}


# ----------------------------------------------------------------------------- the check on CPU

class LiveTensorPeak(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages while it is active: the ones given at the start
    (weights, AdamW state) and every storage an op returns, read at their current size after every op
    (FSDP frees and refills its all-gather buffers with resize_). Counts tensors, not an allocator."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live = {}  # id(storage) -> weakref; dropped when the storage dies
        self.peak_bytes = 0
        for tensor in tensors:
            self.track(tensor)

    def track(self, tensor):
        tensor = getattr(tensor, "_local_tensor", tensor)  # a DTensor's local shard
        if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in self.live:
            storage = tensor.untyped_storage()
            self.live[id(storage)] = weakref.ref(storage, lambda _, key=id(storage): self.live.pop(key, None))

    def current_bytes(self):
        storages = {s.data_ptr(): s.nbytes() for s in (ref() for ref in list(self.live.values())) if s is not None}
        return sum(storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())
        return out


def tracked_step_peak_bytes(cfg, config: GPTConfig, pairs_per_prompt: int, micro_batch_size: int, n_micro: int) -> int:
    """The trainer's own step on CPU (distributed.build_training_state, train.step.train_step, FSDP over
    one gloo process, random weights of config's shape, cfg's precision and checkpointing), the peak
    of its live tensors during the second step (the first creates AdamW's state). Its micro-batches
    are the estimate's worst case (units_per_micro_batch). Makes and ends its own process group."""
    from train.step import train_step  # the trainer's own step, only for this check
    cfg = dataclasses.replace(cfg, device="cpu", sharding="full", compile=False, init_from="scratch",
                              n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                              n_positions=config.n_positions, batch_size=micro_batch_size * n_micro,
                              micro_batch_size=micro_batch_size)
    rank, _, device, mesh = distributed.setup_distributed(cfg)
    try:
        state = distributed.build_training_state(cfg, rank, device, mesh)
        batch = collate(worst_micro_batch(cfg, micro_batch_size, pairs_per_prompt, config.vocab_size),
                        share_prompt=cfg.prefix_sharing)

        def step():
            train_step(state.policy, state.reference, state.optimizer, [batch] * n_micro, cfg, cfg.lr,
                                  state.scaler)
        step()
        held = [*state.policy.parameters(), *(state.reference.parameters() if state.reference else []),
                *(v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        with LiveTensorPeak(held) as tracker:
            step()
        return tracker.peak_bytes
    finally:
        distributed.end_process_group()


# ----------------------------------------------------------------------------- the report

def print_estimate(result: dict):
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    first = result["rows"][0]
    measured = result["measured"]
    print(f"\n{result['config']}: {result['init_from']} ({first['n_params']:,} parameters, {result['n_layer']} layers "
          f"x {result['n_embd']}), {result['precision']}, reference {result['reference_precision']}, "
          f"batch {result['batch_size']} pairs over {result['world_size']} GPU(s), "
          f"{result['max_prompt_len']} + {result['max_len'] - result['max_prompt_len']} tokens, "
          f"prefix_sharing {result['prefix_sharing']}, group_order {result['group_order']} "
          f"({result['pairs_per_prompt']} pairs per prompt)")
    print(f"  state (GiB): weights fp32 {gib(first['param_bytes'])} | grads fp32 "
          f"{gib(4 * first['n_params'] // result['world_size'])} ({gib(4 * first['n_params'])} unsharded while "
          f"accumulating micro-batches) | AdamW "
          f"{gib(first['optimizer_bytes'])} | reference {gib(first['reference_param_bytes'])} | FSDP copies "
          f"{gib(first['fsdp_unsharded_bytes'])}")
    off, on = measured[False], measured[True]
    unit = f"{off['unit_positions']} positions, {off['unit_head_rows']} LM-head rows"
    print(f"  activations, measured on CPU ({off['dtype']}, saved-tensor hooks, 1-2 blocks at the true width, "
          f"scaled to {result['n_layer']}): per unit ({unit}): per block {off['per_block_bytes_per_unit'] / 2**20:.2f} "
          f"MiB ({off['per_block_bytes_per_unit'] / off['unit_positions'] / 1024:.1f} KiB per position), "
          f"{on['per_block_bytes_per_unit'] / 2**20:.2f} MiB with checkpointing; last block + embeddings + head "
          f"{off['first_block_bytes_per_unit'] / 2**20:.1f} MiB; fixed {off['fixed_bytes'] / 2**20:.0f} MiB "
          f"({result['measure_s']:.0f} s to measure)")
    print(f"  {'micro':>5} {'per step':>8} {'units':>5} {'positions':>9} {'act. GiB':>9} {'peak GiB':>9} "
          f"{'ckpt act.':>9} {'ckpt peak':>9}   (micro-batch size, micro-batches per step)")
    by_size = {}
    for r in result["rows"]:
        by_size.setdefault(r["micro_batch_size"], {})[r["activation_checkpointing"]] = r
    for m, pair in by_size.items():
        print(f"  {m:>5} {pair[False]['n_micro']:>8} {pair[False]['units']:>5} {pair[False]['positions']:>9} "
              f"{gib(pair[False]['activation_bytes']):>9} {gib(pair[False]['peak_bytes']):>9} "
              f"{gib(pair[True]['activation_bytes']):>9} {gib(pair[True]['peak_bytes']):>9}")
    choice = result["choice"]
    budget = (f"{result['gpu_gib']:g} GiB less {100 * result['headroom']:.0f}% headroom = "
              f"{result['usable_bytes'] / GIB:.0f} GiB")
    if choice is None:
        print(f"  -> nothing fits {budget}")
    else:
        print(f"  -> micro_batch_size {choice['micro_batch_size']}, activation_checkpointing "
              f"{str(choice['activation_checkpointing']).lower()}: {gib(choice['peak_bytes'])} GiB estimated, "
              f"within {budget} (configured now: {result['configured_micro_batch_size']}, "
              f"{str(result['configured_activation_checkpointing']).lower()})")


def check_on_cpu(result: dict):
    """The chosen setting's estimate beside the tracked peak of the trainer's own step on CPU."""
    choice = result["choice"]
    cfg = train_config.parse_args(["--config_file", os.path.join(ROOT, result["config"]), "--reward=",
                                   f"--activation_checkpointing={choice['activation_checkpointing']}"])
    start = time.perf_counter()
    tracked = tracked_step_peak_bytes(cfg, model_shape(cfg), result["pairs_per_prompt"], choice["micro_batch_size"],
                                      choice["n_micro"])
    result["check_on_cpu"] = {"tracked_peak_bytes": tracked, "estimate_peak_bytes": choice["peak_bytes"]}
    print(f"  check on CPU: the trainer's step (micro-batch {choice['micro_batch_size']} x {choice['n_micro']}, FSDP "
          f"over one process, {cfg.precision}) peaks at {tracked / GIB:.3f} GiB of live tensors; the estimate says "
          f"{choice['peak_bytes'] / GIB:.3f} GiB ({choice['peak_bytes'] / tracked:.3f}x; "
          f"{time.perf_counter() - start:.0f} s)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(os.path.relpath(c, ROOT) for c in CONFIGS),
                   help="comma list of training configs (YAML) to estimate; their precision, reference precision, "
                        "batch size, lengths, prefix_sharing and group_order are used")
    p.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--headroom", type=float, default=0.25,
                   help="fraction of the GPU left free for what is not counted (CUDA context, NCCL, fragmentation) "
                        "and for the estimate's own error")
    p.add_argument("--world_size", type=int, default=1,
                   help="GPUs the batch is split over; each holds 1/world_size of the sharded state")
    p.add_argument("--pairs_per_prompt", type=int, default=0,
                   help="pairs that share a prompt (and one packed row under group_order); 0 = 3 for "
                        "lm_human_preferences (best of 4 against the 3 others), else 1")
    p.add_argument("--check_on_cpu", action="store_true",
                   help="also run the trainer's own step on CPU at each chosen setting (random weights, FSDP over one "
                        "process) and print the peak of its live tensors beside the estimate; needs the model's "
                        "whole training state in RAM (gpt2 and gpt2-medium fit 23 GiB)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the CPU measurement; 0 = torch's default")
    p.add_argument("--json", default=None, help="also write every number here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not (args.gpu_gib > 0 and 0 <= args.headroom < 1 and args.world_size >= 1 and args.pairs_per_prompt >= 0):
        build_parser().error("--gpu_gib must be > 0, --headroom in [0, 1), --world_size >= 1, --pairs_per_prompt >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"ESTIMATE of per-GPU memory for one DPO step (not a GPU measurement); torch {torch.__version__}, "
          f"activations measured on CPU")
    results = []
    for path in args.configs.split(","):
        results.append(estimate_config(os.path.join(ROOT, path) if not os.path.isabs(path) else path, args))
        print_estimate(results[-1])
        if args.check_on_cpu and results[-1]["choice"]:
            check_on_cpu(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"estimate": "per-GPU memory of one DPO step, not a GPU measurement",
                       "torch_version": torch.__version__, "results": results}, f, indent=2,
                      default=lambda o: str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
