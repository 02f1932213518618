"""The SFT warm start (sft_steps): the paper's first stage, run in the same job before DPO, whose
result (out_dir/sft/) is DPO's starting point and reference.
"""
import dataclasses
import gc
import json
import os
import shutil
import signal

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data.batches import sft_pairs
from errors import ConfigError, Preempted
from gpt2 import write_hf_checkpoint
from train import checkpoint, run_dir
from train.config import PPO_KEYS, run_identity_keys
from train.distributed import TrainingState, build_training_state
from train.optim import lr_at
from train.rank0 import on_rank0
from train.resume import load_state, save_state
from train.run_dir import write_atomic
from train.step import assemble_step, count_bad_step, reduce_across_ranks, train_step


# Identity fields the SFT stage does not read: DPO's objective and loss, its reference, sft_on (the
# warm start trains on every response) and PPO's keys. Every other one shapes the SFT model (its recipe).
NOT_READ_BY_SFT = ("objective", "loss_type", "beta", "label_smoothing", "reference_free", "logps",
                   "reference_precision", "sft_on") + PPO_KEYS


def warm_start(cfg, train_pairs, data_sha256, rank, world, device, mesh, log, stop_requests=None) -> TrainingState:
    """The paper's first stage in the same run (sft_steps): SFT of the starting weights on every
    response of the training pairs, preferred or not (the data's language, no preference), exported
    to out_dir/sft/; DPO then starts from it, and it is DPO's frozen reference. A relaunch reuses
    out_dir/sft/ when its sft.json holds this run's recipe (every option the stage's trajectory
    reads), so a resumed DPO run keeps the same reference. SIGTERM/SIGINT during the stage: a
    checkpoint of it in out_dir/sft/checkpoints/ after the current step, from which the same
    command resumes the stage."""
    state = build_training_state(dataclasses.replace(cfg, reference_free=True), rank, device, mesh)  # SFT needs none
    sft_dir = run_dir.sft_dir(cfg.out_dir)
    sft_cfg = dataclasses.replace(cfg, objective="sft", lr=cfg.sft_lr or cfg.lr)
    recipe = ({key: getattr(sft_cfg, key) for key in run_identity_keys() if key not in NOT_READ_BY_SFT}
              | {"from_weights_sha256": state.weights_sha256, "data_sha256": data_sha256})
    if on_rank0(sft_recipe_of, device, f"read {sft_dir}/sft.json", sft_dir) != recipe:
        on_rank0(check_no_dpo_checkpoint, device, f"look for checkpoints in {cfg.out_dir}", cfg.out_dir, sft_dir)
        responses = sft_pairs(train_pairs)
        if len(responses) < cfg.batch_size:
            raise ConfigError(f"sft_steps: the training pairs hold {len(responses)} distinct responses, fewer than "
                              f"batch_size={cfg.batch_size}")
        bad_steps = 0
        for step in range(resume_sft(sft_dir, recipe, state, device, log), cfg.sft_steps):
            # state's AdamW: train_step sets each step's lr (sft_lr's schedule)
            step_input = assemble_step(step, responses, sft_cfg, rank, world, device)
            metrics, grad_norm, applied, stop_signal = train_step(state.policy, None, state.optimizer,
                                                                  step_input.micro_batches, sft_cfg,
                                                                  lr_at(step, cfg.sft_steps, sft_cfg), state.scaler,
                                                                  stop_requests=stop_requests)
            if not applied:  # counted against max_bad_steps as DPO's steps are
                bad_steps = count_bad_step(step, metrics, grad_norm, step_input.pair_indices, step_input.epoch,
                                           state.scaler, bad_steps, sft_cfg, log)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.sft_steps:
                values, _ = reduce_across_ranks(metrics, grad_norm, 0, world, device)
                log(f"sft step {step + 1}/{cfg.sft_steps} | loss {values['loss']:.4f} | norm {values['grad_norm']:.2f}")
            if stop_signal and step + 1 < cfg.sft_steps:
                stop_sft(sft_dir, step + 1, cfg.sft_steps, state, recipe, device, stop_signal)
        full = get_model_state_dict(state.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        on_rank0(run_dir.check_lock_held, device, "check the run directory's lock", cfg.out_dir)
        on_rank0(write_sft_model, device, f"write {sft_dir}", state.config, full, sft_dir, recipe)
        del full
    log(f"SFT warm start: {sft_dir} is DPO's starting point and reference")
    state.policy = state.optimizer = None  # freed before DPO's models are built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return build_training_state(dataclasses.replace(cfg, init_from=sft_dir), rank, device, mesh)


def resume_sft(sft_dir, recipe, state, device, log) -> int:
    """Collective. The SFT step to start from: that of a checkpoint in sft_dir/checkpoints/ left by a
    stop, if it was made with this recipe (loaded into state), else 0."""
    path = on_rank0(checkpoint.newest_checkpoint, device, f"list {sft_dir}/checkpoints", sft_dir, log)
    if path is None or on_rank0(checkpoint.saved_identity, device, f"read {path}", path) != recipe:
        # another recipe's stop (or none readable): gone, so it can never outrank this recipe's saves
        on_rank0(remove_sft_checkpoints, device, f"remove {sft_dir}/checkpoints", sft_dir)
        return 0
    step = load_state(path, state, device)
    log(f"SFT warm start resumed from {path} at step {step}")
    return step


def remove_sft_checkpoints(sft_dir):
    if os.path.isdir(run_dir.checkpoints_dir(sft_dir)):
        shutil.rmtree(run_dir.checkpoints_dir(sft_dir))


def stop_sft(sft_dir, step, sft_steps, state, recipe, device, signum):
    """Collective: SIGTERM/SIGINT reached a rank during the SFT stage. Its checkpoint, then the stop."""
    path = save_state(sft_dir, step, state, recipe, 1, device, os.path.dirname(sft_dir))
    raise Preempted(signum, f"stopped by {signal.Signals(signum).name} during the SFT warm start after step "
                            f"{step}/{sft_steps}; saved {path}. Run the same command to resume from it.")


def check_no_dpo_checkpoint(out_dir, sft_dir):
    """A DPO checkpoint in out_dir was trained against out_dir/sft/ as it is: redoing the SFT stage
    (other sft_* settings, or sft.json gone) would replace its reference under it."""
    if checkpoint.complete_checkpoints(out_dir):  # damaged ones too: they were trained on it as well
        raise ConfigError(f"{out_dir} holds DPO checkpoints trained from {sft_dir}, whose sft.json is missing, "
                          "damaged or does not match this run's SFT settings (any option the SFT stage reads, the "
                          "data or the starting weights); use another out_dir, or the settings of the run that "
                          "made them")


def sft_recipe_of(sft_dir):
    """The recipe of the SFT model in sft_dir; None if there is none, or if sft.json is damaged (the
    stage is then redone, unless DPO checkpoints depend on it: check_no_dpo_checkpoint)."""
    path = os.path.join(sft_dir, "sft.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            recipe = json.loads(f.read())
    except ValueError as err:  # also UnicodeDecodeError
        print(f"{path}: damaged ({err}); the SFT stage is not reused")
        return None
    return recipe if isinstance(recipe, dict) else None


def write_sft_model(config, state_dict, sft_dir, recipe):
    if os.path.exists(os.path.join(sft_dir, "sft.json")):  # first: a crash below leaves no stale recipe
        os.remove(os.path.join(sft_dir, "sft.json"))
    write_hf_checkpoint(config, state_dict, sft_dir)
    write_atomic(os.path.join(sft_dir, "sft.json"), json.dumps(recipe))  # last: the model is complete
    remove_sft_checkpoints(sft_dir)  # a stopped stage's checkpoint is done with
