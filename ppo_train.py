"""PPO for GPT-2 with FSDP2: the DPO paper's baseline (Sec. 6.1, Figure 2), on a ground-truth reward
("PPO-GT", `reward`) or on a reward model trained here from the preference pairs (`ppo_reward:
rm:DIR`; `reward` stays the ground truth of eval/reward).

    python ppo_train.py --config_file config/demo.yaml --init_from=out/demo/sft --reward=vader
    torchrun --nproc_per_node 8 ppo_train.py --config_file config/X.yaml --ppo_reward=rm:out/rm/final

Each step: a rollout (train/rollout.py: batch_size training prompts, one continuation each sampled
from the policy at temperature 1, scored by the reward), then ppo_epochs passes of clipped PPO
updates over it in mini-batches (train/ppo_step.py, with the math in ppo.py), then the adaptive KL
coefficient. The prompts are those of the preference data's training split, and the held-out
evaluation is fsdp_train.py's (eval/reward, eval/kl on the held-out prompts), so PPO and DPO runs on
one pairs file land on one frontier (frontier.py).

The value function is a head on the policy: GPT's score head (one n_embd -> 1 linear layer on the
last hidden state), trained with the policy by one loss, pg + vf_coef * vf. This is TRL's 2023
PPOTrainer (AutoModelForCausalLMWithValueHead), which the DPO paper's PPO baseline was built on,
and it costs one model: a separate value network initialised from the reward model (Stiennon et
al. 2020) would add a second copy of the weights, its gradients and its optimizer state (for
gpt2-large, 774M parameters: about 12 GB more in fp32 with AdamW). The head starts from N(0,
1/(n_embd + 1)); it is dropped from the export (final/ is a GPT2LMHeadModel).

Rewards are normalised as Ziegler et al. 2019 do: by the mean and standard deviation of the scores
of the first rollout (the starting policy's samples), fixed for the run and kept in its checkpoints.
Everything else is fsdp_train.py's: the run directory and its lock, checkpoints, resume (the
rollout's sampling is seeded by the step: a resumed run is the uninterrupted one), SIGTERM, the
export.
"""
import sys
import time


import fsdp_train
from errors import ConfigError
from fsdp_train import (between_steps, finish, first_samples_and_eval, load_data, peak_memory_gib, plan_steps,
                        resume_point, start_job, stop_if_asked)
from ppo import KLController, masked_mean
from train.config import parse_args
from train.distributed import build_training_state
from train.evaluation import distinct_prompts
from train.optim import lr_at
from train.preemption import StopRequests
from train.rollout import Rollout, make_rollout
from train.ppo_step import advantages_of, ppo_updates
from train.run_dir import MetricsLog
from train.step import reduce_across_ranks


def main(argv=None, stop_requests=None):
    cfg = parse_args(argv, prog="ppo_train.py")
    stop_requests = stop_requests or StopRequests()
    train_pairs, eval_pairs, counts, data_sha256 = load_data(cfg)
    train_prompts = distinct_prompts(train_pairs, len(train_pairs))
    if len(train_prompts) < cfg.batch_size:
        raise ConfigError(f"{len(train_prompts)} training prompts is fewer than batch_size={cfg.batch_size}")
    rank, world, device, mesh, log = start_job(cfg, cfg.mini_batch_size, "mini_batch_size")
    log(f"data: {len(train_prompts)} training prompts, {counts['eval_prompts']} held out")

    state = build_training_state(cfg, rank, device, mesh)
    state.extra = {"kl_coef": cfg.kl_coef, "score_mean": None, "score_std": None}  # checkpointed with the weights
    log(f"model: {state.policy.num_params() / 1e6:.1f}M parameters with a value head, {world} rank(s), "
        f"precision={cfg.precision}, device={device.type}, maximising reward={cfg.ppo_reward or cfg.reward}")
    steps_per_epoch, total_steps, last_step = plan_steps(cfg, len(train_prompts))
    identity, step = resume_point(cfg, state, data_sha256, device, log, last_step)
    if step is None:
        return
    metrics_log = MetricsLog(cfg, device)
    stop_if_asked(stop_requests, device, "building the models")
    sample_prompts = first_samples_and_eval(cfg, state, step, eval_pairs, None, metrics_log, rank, world, device, log)
    stop_if_asked(stop_requests, device, "the first samples and eval")

    log(f"training: {max(0, last_step - step)} PPO steps of {cfg.batch_size} rollouts, {cfg.ppo_epochs} epochs of "
        f"mini-batches of {cfg.mini_batch_size} each ({steps_per_epoch} steps per pass over the prompts)")
    t_start, step_start, bad_steps, window_s, window_steps = time.time(), step, 0, 0.0, 0
    while step < last_step:
        t_rollout = time.time()
        rollout = make_rollout(state.policy, state.reference, train_prompts, step, cfg, rank, world, device)
        t_update = time.time()
        if state.extra["score_mean"] is None:
            set_score_normalisation(state, rollout, log)
        kl_coef = state.extra["kl_coef"]
        _, advantages, returns = advantages_of(rollout, kl_coef, state.extra["score_mean"], state.extra["score_std"], cfg)
        metrics, grad_norm, stop_signal, n_tokens, bad_steps = ppo_updates(
            state, rollout, advantages, returns, cfg, step, lr_at(step, total_steps, cfg), rank, world, device, log,
            bad_steps, stop_requests)
        t_end = time.time()
        rollout_values = rollout_metrics(rollout, returns, kl_coef, state.extra)
        state.extra["kl_coef"] = KLController(kl_coef, cfg.target_kl, cfg.kl_horizon).update(
            rollout_values["objective/kl"], cfg.batch_size)
        step += 1
        window_s, window_steps = window_s + t_end - t_rollout, window_steps + 1  # evals and saves not counted
        if step % cfg.log_every == 0 or step == last_step:
            values, tokens = reduce_across_ranks(metrics, grad_norm, n_tokens, world, device)
            values |= rollout_values | {
                "lr": lr_at(step - 1, total_steps, cfg), "epoch": step / steps_per_epoch,
                "rollout_tokens_per_s": rollout.mask.numel() / (t_update - t_rollout),  # sampled, all ranks
                "update_tokens_per_s": tokens / (t_end - t_update),  # forward and backward, all ranks
                "step_s": window_s / window_steps, "peak_memory_gib": peak_memory_gib(device)}
            metrics_log.record(step, values)
            log(ppo_log_line(f"step {step}/{last_step}", values, (t_end - t_start) / (step - step_start) * (last_step - step)))
            window_s, window_steps = 0.0, 0
        between_steps(cfg, state, step, last_step, steps_per_epoch, identity, eval_pairs, None, stop_signal, metrics_log,
                      rank, world, device, log)
    finish(cfg, state, step, step_start, steps_per_epoch, identity, eval_pairs, None, sample_prompts, metrics_log,
           counts, sys.argv[1:] if argv is None else argv, rank, world, device, log)


def set_score_normalisation(state, rollout: Rollout, log):
    """The first rollout's score statistics (the starting policy's samples), fixed for the run."""
    scores = rollout.scores.double()
    mean, std = scores.mean().item(), scores.std().item()
    if not std > 1e-6:  # every first score equal (VADER gives 0.0 to text without sentiment words): centre only
        log(f"the first rollout's {len(scores)} scores are all {mean:.4f}: scores are centred, not scaled")
        std = 1.0
    state.extra["score_mean"], state.extra["score_std"] = mean, std
    log(f"scores normalised by the first rollout's: mean {mean:.4f}, std {std:.4f}")


def rollout_metrics(rollout: Rollout, returns, kl_coef, extra) -> dict:
    """The rollout batch's own metrics, the same on every rank (TRL's PPO names)."""
    mask = rollout.mask.float()
    log_ratio = (rollout.logps - rollout.ref_logps) * mask
    return {"env/reward_mean": rollout.scores.mean().item(), "env/reward_std": rollout.scores.std().item(),
            "objective/kl": log_ratio.sum(-1).mean().item(), "objective/kl_coef": kl_coef,
            "objective/entropy": (-rollout.logps * mask).sum(-1).mean().item(),
            "ppo/mean_non_score_reward": (-kl_coef * log_ratio).sum(-1).mean().item(),
            "ppo/returns/mean": masked_mean(returns, mask).item(),
            "tokens/responses_len_mean": mask.sum(-1).mean().item()}


def ppo_log_line(label, values, eta_s):
    return (f"{label} | reward {values['env/reward_mean']:.4f} | kl {values['objective/kl']:.3f} | "
            f"kl_coef {values['objective/kl_coef']:.4f} | pg {values['ppo/loss/policy']:.4f} | "
            f"vf {values['ppo/loss/value']:.4f} | clip {values['ppo/policy/clipfrac']:.2f} | "
            f"norm {values['grad_norm']:.2f} | rollout {values['rollout_tokens_per_s']:,.0f} tok/s | "
            f"update {values['update_tokens_per_s']:,.0f} tok/s | mem {values['peak_memory_gib']:.2f} GiB | "
            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta_s))}")


def run(argv=None, stop_requests=None) -> int:
    """fsdp_train.run's error boundary around this job: bad input exit 2 with one line, a stopped run
    exit 1, SIGTERM/SIGINT a checkpoint and 128 + the signal, anything else its traceback."""
    return fsdp_train.run(argv, stop_requests, job=main)


if __name__ == "__main__":
    sys.exit(run())
