"""DPO (and SFT) training of GPT-2 with FSDP2.

    python fsdp_train.py --config_file config/demo.yaml                      # one process
    torchrun --nproc_per_node 8 fsdp_train.py --config_file config/gpt2_xl_hf.yaml --micro_batch_size=8
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint HOST:29500 fsdp_train.py ...

Read top to bottom: data, log lines, then main() — the run as a table of contents — and run(), the
one error boundary. The parts live in train/ (README, "A map of the folders"): the step
(train/step.py), start or resume and the saves (resume.py), the SFT warm start (warm_start.py), the
distributed set-up and the models (distributed.py), the run directory's files (run_dir.py),
evaluation, samples and the precomputed reference (evaluation.py).
Launching the same command again on an out_dir with a complete checkpoint resumes from it.
"""
import json
import resource
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data.batches import check_batch_sizes, data_fingerprint, pairs_of, sft_pairs, split_groups, truncate_groups
from data.formats import load_preferences
from data.texts import TEXT_PROMPT, load_texts
from errors import ConfigError, Preempted, exit_code_of
from gpt2 import SCORE_HEAD
from train.config import TrainConfig, data_options, parse_args, reference_precision_name
from train.distributed import build_training_state, check_model_fits, end_process_group, setup_distributed
from train.evaluation import eval_prompt_set, evaluate, precompute_reference_logps, sample_texts
from train.export import training_command, write_export
from train.optim import lr_at
from train.preemption import StopRequests
from train.rank0 import on_rank0
from train.resume import run_identity, save, start_or_resume, stop_after_signal
from train.reward import fetch_reward
from train.run_dir import (MetricsLog, check_shared_out_dir, check_writable, final_dir, held_run_dirs, lock_run_dir,
                           metrics_file, read_metrics, unlock_run_dirs, write_samples_before, write_samples_table)
from train.step import assemble_step, count_bad_step, reduce_across_ranks, train_step
from train.warm_start import warm_start


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig):
    """Files -> (train pairs, eval pairs, counts, the data's sha256). Runs before any process group
    or GPU work, so bad data stops the run before anything is written."""
    if cfg.dataset == "text":  # plain text for SFT: a group per text, cut to max_len (data/texts.py)
        groups, counts = load_texts(cfg.data_path, cfg.max_len, **data_options(cfg))
    else:
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
    if cfg.eval_prompts:
        counts["eval_prompt_file"] = len(eval_prompt_set(cfg))  # read (and checked) before any work
    return train_pairs, eval_pairs, counts, data_fingerprint(groups)


# ----------------------------------------------------------------------------- log lines

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


# ----------------------------------------------------------------------------- samples

def sample_prompts_of(eval_pairs, cfg):
    """The held-out prompts of the before/after table: n_samples, spread over the eval pairs, or the first
    of eval_prompts (none for a reward model, which samples nothing; for plain text, n_samples texts
    begun from <|endoftext|>)."""
    if cfg.objective == "reward_model":
        return []
    if cfg.dataset == "text":
        return [TEXT_PROMPT] * cfg.n_samples
    if cfg.eval_prompts:
        return eval_prompt_set(cfg)[:cfg.n_samples]
    return [p.prompt for p in eval_pairs[:: max(1, len(eval_pairs) // max(1, cfg.n_samples))]][:cfg.n_samples]



# ----------------------------------------------------------------------------- main

def main(argv=None, stop_requests=None):
    cfg = parse_args(argv)
    stop_requests = stop_requests or StopRequests()  # run() installs it as the SIGTERM/SIGINT handler
    train_pairs, eval_pairs, counts, data_sha256 = load_data(cfg)  # before any process group, GPU or file work
    rank, world, device, mesh, log = start_job(cfg, cfg.batch_size)
    log(f"data: {json.dumps(counts)}")

    if cfg.sft_steps and cfg.objective == "dpo":
        state = warm_start(cfg, train_pairs, data_sha256, rank, world, device, mesh, log, stop_requests)
    else:
        state = build_training_state(cfg, rank, device, mesh)
    log(f"model: {state.policy.num_params() / 1e6:.1f}M parameters, {world} rank(s), sharding={cfg.sharding}, "
        f"precision={cfg.precision}, device={device.type}"
        + (f", reference in {reference_precision_name(cfg)}"
           if state.reference is not None and reference_precision_name(cfg) != cfg.precision else ""))
    steps_per_epoch, total_steps, last_step = plan_steps(cfg, len(train_pairs))
    identity, step = resume_point(cfg, state, data_sha256, device, log, last_step)
    if step is None:
        return
    metrics_log = MetricsLog(cfg, device)  # W&B starts once the run directory is this run's
    stop_if_asked(stop_requests, device, "building the models")

    reference_logps = reference_eval_logps = None
    if cfg.precompute_reference and cfg.objective == "dpo" and not cfg.reference_free:
        log("precomputing reference log-probs")
        reference_logps, reference_eval_logps = precompute_reference_logps(
            state.reference, train_pairs, eval_pairs, cfg, rank, world, device, identity)
        state.reference = None  # freed: the reference model is not held during training
        stop_if_asked(stop_requests, device, "the reference's log-probs (cached in out_dir)")
    sample_prompts = first_samples_and_eval(cfg, state, step, eval_pairs, reference_eval_logps, metrics_log,
                                            rank, world, device, log)
    stop_if_asked(stop_requests, device, "the first samples and eval")

    log(f"training: {max(0, last_step - step)} steps of {cfg.batch_size} pairs ({steps_per_epoch} steps per epoch)")
    t_start, step_start, window_tokens, window_s, window_steps, bad_steps = time.time(), step, 0, 0.0, 0, 0
    while step < last_step:
        t_step = time.time()
        step_input = assemble_step(step, train_pairs, cfg, rank, world, device, reference_logps)
        window_tokens += step_input.n_tokens
        metrics, grad_norm, applied, stop_signal = train_step(
            state.policy, state.reference, state.optimizer, step_input.micro_batches, cfg,
            lr_at(step, total_steps, cfg), state.scaler, step_input.reference_logps, stop_requests)
        if not applied:
            bad_steps = count_bad_step(step, metrics, grad_norm, step_input.pair_indices, step_input.epoch, state.scaler,
                                       bad_steps, cfg, log)
        step += 1
        window_s, window_steps = window_s + time.time() - t_step, window_steps + 1  # evals and saves not counted
        if step % cfg.log_every == 0 or step == last_step:
            values, tokens = reduce_across_ranks(metrics, grad_norm, window_tokens, world, device)
            values |= {"lr": lr_at(step - 1, total_steps, cfg), "tokens_per_s": tokens / window_s,
                       "step_s": window_s / window_steps, "epoch": step / steps_per_epoch}  # fractional, as TRL's
            metrics_log.record(step, values)
            eta_s = (time.time() - t_start) / (step - step_start) * (last_step - step)
            log(format_log_line(f"step {step}/{last_step}", values, device, eta_s))
            window_tokens, window_s, window_steps = 0, 0.0, 0
        between_steps(cfg, state, step, last_step, steps_per_epoch, identity, eval_pairs, reference_eval_logps,
                      stop_signal, metrics_log, rank, world, device, log)

    finish(cfg, state, step, step_start, steps_per_epoch, identity, eval_pairs, reference_eval_logps, sample_prompts,
           metrics_log, counts, sys.argv[1:] if argv is None else argv, rank, world, device, log)


def plan_steps(cfg, items_per_epoch):
    """(optimizer steps per epoch, steps in all epochs, the last step this command trains to) for
    batch_size of items_per_epoch (pairs; PPO's prompts) a step."""
    steps_per_epoch = items_per_epoch // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    return steps_per_epoch, total_steps, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps


def resume_point(cfg, state, data_sha256, device, log, last_step):
    """Collective: (the run's identity, the step to start from: 0, a checkpoint's, or None when the
    run is complete; train/resume.py's start_or_resume)."""
    identity = run_identity(cfg, data_sha256, state.weights_sha256)
    return identity, start_or_resume(cfg, identity, state, device, log, last_step)


def first_samples_and_eval(cfg, state, step, eval_pairs, reference_eval_logps, metrics_log, rank, world, device, log):
    """At step 0, where the policy still equals the reference: the "before" samples and the first
    point of the eval curves. Returns the prompts of the sample table."""
    sample_prompts = sample_prompts_of(eval_pairs, cfg)
    if sample_prompts and step == 0:
        before, before_rewards = sample_texts(state.policy, sample_prompts, cfg, device)
        on_rank0(write_samples_before, device, "write samples.md", cfg, sample_prompts, before, before_rewards)
    if step == 0 and (eval_pairs or cfg.eval_prompts):
        line = metrics_log.record(step, timed_evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                                       cfg, rank, world, device))
        log(format_log_line("eval", line))
    return sample_prompts


def between_steps(cfg, state, step, last_step, steps_per_epoch, identity, eval_pairs, reference_eval_logps, stop_signal,
                  metrics_log, rank, world, device, log):
    """After step `step` of a run (DPO's, PPO's), unless it is the last (finish's): the eval and the
    checkpoint that are due, then the stop that a SIGTERM/SIGINT asked for (received before this
    step's check, on any rank)."""
    if step == last_step:
        return
    if cfg.eval_every and step % cfg.eval_every == 0:
        line = metrics_log.record(step, timed_evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                                       cfg, rank, world, device))
        log(format_log_line("eval", line))
    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
        save(cfg, state, step, steps_per_epoch, identity, device)
    if stop_signal:
        stop_after_signal(cfg, state, step, steps_per_epoch, identity, device, stop_signal)


def timed_evaluate(*args) -> dict:
    """evaluate(*args) (train/evaluation.py), with the seconds it took as eval/seconds."""
    started = time.time()
    metrics = evaluate(*args)
    return metrics | {"eval/seconds": time.time() - started}


def start_job(cfg, batch_size, batch_size_name="batch_size"):
    """Every rank, before the first collective: the starting weights and the reward fetched (a hub
    download of 6.4 GB for gpt2-xl can outlast NCCL's 10-minute timeout, so no rank waits in a
    collective meanwhile; the hub cache's locks let one process download and the others wait for
    the file), and the weights' config.json checked. Then the process group, and the run directory
    locked and checked, before anything is written. batch_size: what is cut into micro-batches over
    the ranks (pairs; PPO's mini-batch of rollouts). -> (rank, world, device, mesh, log)."""
    check_model_fits(cfg)
    for reward in dict.fromkeys(r for r in (cfg.reward, cfg.ppo_reward) if r):
        fetch_reward(reward)
    rank, world, device, mesh = setup_distributed(cfg)
    check_batch_sizes(batch_size, cfg.micro_batch_size, world, batch_size_name)
    log = log_on_rank0(rank)
    on_rank0(lock_run_dir, device, f"lock {cfg.out_dir}", cfg.out_dir, log)  # before anything is written
    on_rank0(check_writable, device, f"write to {cfg.out_dir}", cfg.out_dir)
    check_shared_out_dir(cfg.out_dir, device)
    return rank, world, device, mesh, log


def finish(cfg, state, step, step_start, steps_per_epoch, identity, eval_pairs, reference_eval_logps, sample_prompts,
           metrics_log, counts, argv, rank, world, device, log):
    """The end of a run (DPO's, PPO's): the final eval and the last checkpoint, then what is made from
    them (samples.md, final/), which a relaunch after a crash here makes again from that checkpoint
    (start_or_resume)."""
    line = None if step > step_start else on_rank0(recorded_final_eval, device, "read metrics.jsonl", cfg.out_dir, step)
    if line is None:
        line = metrics_log.record(step, timed_evaluate(state.policy, state.reference, eval_pairs, reference_eval_logps,
                                                       cfg, rank, world, device))
    log(format_log_line("final eval", line))
    if step > step_start:
        save(cfg, state, step, steps_per_epoch, identity, device)
    if sample_prompts:
        after, after_rewards = sample_texts(state.policy, sample_prompts, cfg, device)
        on_rank0(write_samples_table, device, "write samples.md", cfg, sample_prompts, after, log, after_rewards)
    export(cfg, state, step, device, log, line, counts, argv)
    metrics_log.close()
    dist.barrier()


def recorded_final_eval(out_dir, step):
    """The eval line metrics.jsonl holds for `step` (the run ended there and is being finished), or None."""
    lines = [r for r in read_metrics(out_dir) if r["step"] == step and any(k.startswith("eval/") for k in r)]
    return lines[-1] if lines else None


def stop_if_asked(stop_requests, device, after):
    """Collective, between the stages before the first step: stop now if any rank received
    SIGTERM/SIGINT (each stage keeps what it made: out_dir/sft/, the reference cache)."""
    if signum := stop_requests.agreed(device):
        raise Preempted(signum, f"stopped by {signal.Signals(signum).name} after {after}, before training; "
                                "run the same command to go on")


def export(cfg, state, step, device, log, final_metrics, counts, argv):
    """Collective: the trained policy as out_dir/final/, a Hugging Face model folder (weights, config,
    GPT-2's tokenizer, generation config, model card; export.py), rank 0 writing, whole or not at all."""
    final = final_dir(cfg.out_dir)
    log(f"exporting {final} (step {step})")
    full = get_model_state_dict(state.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prog = "fsdp_train.py"
    if cfg.objective == "ppo":  # its value head is training machinery: the export is the policy, a language model
        full.pop(SCORE_HEAD, None)  # (rank 0 alone holds the full state dict)
        prog = "ppo_train.py"
    on_rank0(write_export, device, f"export {final}", final, step, state.config, full, cfg, final_metrics, counts,
             training_command(argv, prog))
    log(f"exported {final} (a transformers model folder with its tokenizer and model card); metrics in "
        f"{metrics_file(cfg.out_dir)}")


def run(argv=None, stop_requests=None, job=None) -> int:
    """The error boundary (errors.exit_code_of). Bad input (a config value, a data file, weights, a
    checkpoint, a run directory in use): one line that names what and where, exit 2. A run stopped
    on purpose (non-finite losses or weights): one line, exit 1. SIGTERM/SIGINT: a checkpoint, one
    line, exit 128 + the signal. Anything else is a bug or a failure of the machine: it propagates
    with its traceback (exit 1). On every path the process group is destroyed after main's FSDP
    state is freed, the run directory's lock released and the signal handlers restored.
    stop_requests: for a caller that runs several jobs (frontier.py), to see afterwards whether a
    signal came while this one was finishing. job: the main to run (default this file's; ppo_train.py's)."""
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    stop_requests = stop_requests or StopRequests()
    stop_requests.install()
    locked_before = len(held_run_dirs())  # a caller's own (frontier.py's directory) stays locked
    try:
        return exit_code_of(job or main, argv, stop_requests)
    finally:
        end_process_group()  # main's FSDP modules freed first: its threads are joined here, not at exit
        unlock_run_dirs(keep=locked_before)
        stop_requests.restore()


if __name__ == "__main__":
    sys.exit(run())
