"""Start or resume: which checkpoint a run continues from (its identity must match, its checksums
hold), the run directory made to agree with it, and the saves (periodic, final, after SIGTERM).
"""
import signal

from errors import Preempted
from gpt2 import resolve_checkpoint_dir, weight_files
from train import checkpoint
from train.config import PPO_KEYS, TrainConfig, reference_precision_name, run_identity_keys
from train.export import exported_step
from train.rank0 import on_rank0
from train.run_dir import check_lock_held, final_dir, keep_metrics_until, write_config


# ----------------------------------------------------------------------------- start or resume

def run_identity(cfg: TrainConfig, data_sha256: str, weights_sha256: str) -> dict:
    """What a checkpoint must agree on to be resumed, and the reference cache to be reused."""
    keys = run_identity_keys() if cfg.objective == "ppo" else tuple(k for k in run_identity_keys() if k not in PPO_KEYS)
    identity = {k: getattr(cfg, k) for k in keys}  # PPO's keys only for PPO: older DPO checkpoints still resume
    identity["reference_precision"] = reference_precision_name(cfg)  # "same" and its dtype are one run
    if cfg.objective == "ppo":  # what PPO maximises, and its episodes' length, fix its trajectory too
        maximised = cfg.ppo_reward or cfg.reward
        identity |= {"maximised_reward": maximised, "max_new_tokens": cfg.max_new_tokens,
                     "maximised_reward_weights": reward_model_fingerprint(maximised)}
    return identity | {"data_sha256": data_sha256, "weights_sha256": weights_sha256}


def reward_model_fingerprint(spec):
    """A reward model's weights (rm:DIR, retrained in place or not), as [size, sha256]; None for the
    other rewards, which their spec names."""
    if not spec.startswith("rm:"):
        return None
    return [checkpoint.file_fingerprint(file) for file in sorted(weight_files(resolve_checkpoint_dir(spec[3:])))]


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
    the steps before it. None when that checkpoint is at or past last_step and final/ is its
    complete export: the run is complete, and nothing in out_dir is touched. At or past last_step
    without that export (a crash after the last save), its step: the run finishes from it without
    training (fsdp_train.main's tail: samples, final/)."""
    on_rank0(checkpoint.recover_replaced_checkpoints, device, "recover checkpoints", cfg.out_dir, log)
    # rank 0 decides, every rank follows: on per-node disks, nodes that saw no checkpoint would skip
    # the load collective and hang (check_shared_out_dir refuses such disks first)
    path = on_rank0(checkpoint.newest_checkpoint, device, "list checkpoints", cfg.out_dir, log)
    step = 0
    if path:
        on_rank0(checkpoint.check_compatible, device, f"read {path}", path, identity, identity_hints(cfg))
        saved_step = on_rank0(checkpoint.saved_step, device, f"read {path}", path)
        if saved_step >= last_step:
            if on_rank0(exported_step, device, f"read {final_dir(cfg.out_dir)}", final_dir(cfg.out_dir)) == saved_step:
                log(complete_message(cfg, path, saved_step, last_step))
                return None
            log(f"{path} is at or past this command's last step ({last_step}), but {final_dir(cfg.out_dir)} is not "
                "its complete export (the run was stopped after its last save): finishing from it, without training")
    on_rank0(checkpoint.remove_partial_checkpoints, device, "clean up checkpoints", cfg.out_dir, log)
    if path:
        step = load_state(path, state, device)
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
    save_state(cfg.out_dir, step, state, identity, cfg.keep_checkpoints, device, cfg.out_dir,
               epoch=step // steps_per_epoch, pairs_seen=step * cfg.batch_size)


def save_state(out_dir, step, state, identity, keep, device, locked_dir, **extra):
    """Collective: state's policy and optimizer as a checkpoint in out_dir/checkpoints/ (DPO's, or the
    SFT stage's in out_dir/sft/), with its step, loss scale and identity, once rank 0 has checked that
    this run still holds locked_dir's lock. Returns its path."""
    on_rank0(check_lock_held, device, f"check {locked_dir}/.lock", locked_dir)
    return checkpoint.save_checkpoint(out_dir, step, state.policy, state.optimizer, {
        "step": step, "loss_scale": state.scaler.scale, "good_steps": state.scaler.good_steps, "identity": identity,
        **state.extra, **extra}, keep, device)


def load_state(path, state, device) -> int:
    """Collective: the checkpoint at path, verified (rank 0) and loaded into state; its step."""
    on_rank0(checkpoint.verify_checkpoint, device, f"verify {path}", path)
    train_state = checkpoint.load_checkpoint(path, state.policy, state.optimizer)
    state.scaler.scale, state.scaler.good_steps = train_state["loss_scale"], train_state["good_steps"]
    state.extra |= {k: train_state[k] for k in state.extra if k in train_state}
    return train_state["step"]


def stop_after_signal(cfg, state, step, steps_per_epoch, identity, device, signum):
    """Collective: every rank received or was told of SIGTERM/SIGINT after this step; save, stop."""
    path, _ = checkpoint.step_dirs(cfg.out_dir, step)
    if not (cfg.ckpt_every and step % cfg.ckpt_every == 0):  # else just saved
        save(cfg, state, step, steps_per_epoch, identity, device)
    raise Preempted(signum, f"stopped by {signal.Signals(signum).name} after step {step}; saved {path}. Run the "
                            "same command to resume from it.")
