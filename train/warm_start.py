"""The SFT warm start (sft_steps): the paper's first stage, run in the same job before DPO, whose
result (out_dir/sft/) is DPO's starting point and reference.
"""
import dataclasses
import gc
import json
import os

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data.batches import Pair
from errors import ConfigError
from gpt2 import write_hf_checkpoint
from train import checkpoint
from train.distributed import TrainingState, build_training_state
from train.optim import lr_at
from train.rank0 import on_rank0
from train import run_dir
from train.run_dir import write_atomic
from train.step import assemble_step, reduce_across_ranks, train_step


def warm_start(cfg, train_pairs, data_sha256, rank, world, device, mesh, log) -> TrainingState:
    """The paper's first stage in the same run (sft_steps): SFT of the starting weights on every
    response of the training pairs, preferred or not (the data's language, no preference), exported
    to out_dir/sft/; DPO then starts from it, and it is DPO's frozen reference. A relaunch reuses
    out_dir/sft/ when its sft.json matches, so a resumed DPO run keeps the same reference; an SFT
    stage cut short is redone from the start (it has no checkpoints of its own)."""
    state = build_training_state(dataclasses.replace(cfg, reference_free=True), rank, device, mesh)  # SFT needs none
    sft_dir = run_dir.sft_dir(cfg.out_dir)
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
