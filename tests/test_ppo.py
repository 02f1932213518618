"""PPO (ppo.py, train/rollout.py, train/ppo_step.py, ppo_train.py) against independent references: GAE
and the losses against plain loops and their formulas, a whole update against a straightforward
implementation on transformers' GPT-2 with the same weights, two ranks against one process, and the
job's guarantees (a rollout whose ranks end at different lengths, kill and resume)."""
import json
import math
import re
import signal
import statistics

import pytest
import torch
from transformers import GPT2LMHeadModel

import ppo
import warm
from gpt2 import CONV1D_SUFFIXES, EOT_ID, GPT, GPTConfig, write_hf_checkpoint
from train.config import TrainConfig
from train.distributed import TrainingState
from train.optim import LossScaler, make_optimizer
from train.ppo_step import ppo_updates
from train.rollout import Rollout
from test_fsdp_train import TINY, demo_run, final_weights  # noqa: F401 -- demo_run: the session's demo, a fixture
from test_faults import kill_when_logged

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the math, against loops

def ragged(B=5, T=7, seed=0):
    """Random values over rows of different lengths (one full, one of a single token)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [T, 1, 4, T - 1, 3][:B]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    return torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen), mask, lengths


def test_gae_is_the_backward_recursion_written_out():
    rewards, values, mask, lengths = ragged()
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        expected, following = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0  # the episode ends at the row's last token
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            following = delta + gamma * lam * following
            expected[t] = following
        assert advantages[row, :n].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert returns[row, :n].tolist() == pytest.approx([a + values[row, t].item() for t, a in enumerate(expected)],
                                                          rel=1e-5, abs=1e-6)
        assert (advantages[row, n:] == 0).all() and (returns[row, n:] == 0).all()


def test_kl_penalised_rewards_and_whitening_are_their_formulas():
    logps, ref_logps, mask, lengths = ragged(seed=1)
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    rewards = ppo.kl_penalised_rewards(scores, logps, ref_logps, mask, kl_coef=0.3)
    for row, n in enumerate(lengths):
        expected = [-0.3 * (logps[row, t] - ref_logps[row, t]).item() for t in range(n)]
        expected[-1] += scores[row].item()
        assert rewards[row, :n].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert (rewards[row, n:] == 0).all()
    whitened = ppo.whiten(logps, mask)
    inside = [logps[r, t].item() for r, n in enumerate(lengths) for t in range(n)]
    mean, sd = statistics.fmean(inside), statistics.stdev(inside)
    assert whitened[mask].tolist() == pytest.approx([(v - mean) / sd for v in inside], rel=1e-4, abs=1e-5)


def test_the_clipped_losses_are_their_formulas_token_by_token():
    logps, old_logps, mask, lengths = ragged(seed=2)
    advantages, returns = torch.randn(5, 7), torch.randn(5, 7)
    values, old_values = torch.randn(5, 7), torch.randn(5, 7)
    eps, eps_v = 0.2, 0.3
    pg, pg_metrics = ppo.policy_loss(logps, old_logps, advantages, mask, eps)
    vf, vf_metrics = ppo.value_loss(values, old_values, returns, mask, eps_v)
    tokens = [(r, t) for r, n in enumerate(lengths) for t in range(n)]
    pg_terms, vf_terms, clipped, v_clipped, approx = [], [], 0, 0, []
    for r, t in tokens:
        ratio = math.exp(logps[r, t].item() - old_logps[r, t].item())
        a = advantages[r, t].item()
        unclipped_term, clipped_term = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        pg_terms.append(max(unclipped_term, clipped_term))
        clipped += clipped_term > unclipped_term
        approx.append(0.5 * (logps[r, t].item() - old_logps[r, t].item()) ** 2)
        v, old, ret = values[r, t].item(), old_values[r, t].item(), returns[r, t].item()
        v_clip = old + min(max(v - old, -eps_v), eps_v)
        vf_terms.append(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2))
        v_clipped += (v_clip - ret) ** 2 > (v - ret) ** 2
    assert pg.item() == pytest.approx(statistics.fmean(pg_terms), rel=1e-5)
    assert vf.item() == pytest.approx(statistics.fmean(vf_terms), rel=1e-5)
    assert pg_metrics["policy/clipfrac"].item() == pytest.approx(clipped / len(tokens))
    assert pg_metrics["policy/approxkl"].item() == pytest.approx(statistics.fmean(approx), rel=1e-5)
    assert vf_metrics["val/clipfrac"].item() == pytest.approx(v_clipped / len(tokens))


def test_the_adaptive_kl_controller_is_ziegler_et_al():
    controller = ppo.KLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl in (3.0, 6.5, 20.0, 0.0):
        expected *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 256 / 10000
        assert controller.update(kl, 256) == pytest.approx(expected, rel=1e-12)
    assert ppo.KLController(0.2, target=0).update(50.0, 256) == 0.2  # no target: fixed


# ----------------------------------------------------------------------------- one whole update

def hand_made_rollout(policy, gen):
    """Four rollouts of ragged prompts and responses (one ended by <|endoftext|> after 2 tokens), with
    old log-probs and values from the policy itself, as a rollout would have them."""
    prompts = [[464, 3290, 373], [40], [1212, 318, 257, 1332, 13], [464, 2068]]
    responses = torch.randint(0, 50000, (4, 5), generator=gen)
    responses[1, 1:] = EOT_ID
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2:] = False
    from train.rollout import response_forward
    with torch.no_grad():
        logps, values, _ = response_forward(policy, prompts, responses, head="both")
    return Rollout(list(range(4)), prompts, responses, mask, torch.randn(4, generator=gen), logps,
                   logps - 0.1 * torch.rand(4, 5, generator=gen), values)


def reference_update(hf, value_head, rollout, advantages, returns, cfg, epochs):
    """The update written out on transformers' GPT-2: per epoch one mini-batch of all rollouts, each
    row run alone (no padding), its response tokens' log-probs and values, the losses averaged over
    every response token, a clipped gradient, AdamW."""
    params = list(hf.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0)
    n_tokens = int(rollout.mask.sum())
    losses, norms = [], []
    for _ in range(epochs):
        total = 0.0
        for row, prompt in enumerate(rollout.prompts):
            n = int(rollout.mask[row].sum())
            ids = torch.tensor([prompt + rollout.responses[row, :n].tolist()])
            hidden = hf.transformer(ids).last_hidden_state[0]  # (P + n, C), after ln_f
            predicting = hidden[len(prompt) - 1:len(prompt) - 1 + n]
            logps = hf.lm_head(predicting).log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]
            values = value_head(predicting)[:, 0]
            for t in range(n):
                ratio = torch.exp(logps[t] - rollout.logps[row, t])
                a = advantages[row, t]
                pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
                old_v = rollout.values[row, t]
                v_clip = old_v + (values[t] - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                vf = 0.5 * torch.maximum((values[t] - returns[row, t]) ** 2, (v_clip - returns[row, t]) ** 2)
                total = total + (pg + cfg.vf_coef * vf) / n_tokens
        total.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total.item())
    return losses, norms


def test_a_whole_ppo_update_equals_a_straightforward_one_on_transformers(tmp_path, one_process_group):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    policy = GPT(config, score_head=True).init_weights(seed=0)
    write_hf_checkpoint(config, {k: v for k, v in policy.state_dict().items() if k != "score.weight"}, tmp_path / "lm")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "lm").float()
    value_head = torch.nn.Linear(32, 1, bias=False)
    value_head.weight.data.copy_(policy.score.weight.data)
    cfg = TrainConfig(objective="ppo", reward="vader", batch_size=4, mini_batch_size=4, micro_batch_size=2,
                      ppo_epochs=2, lr=1e-3, grad_clip=0.5, precision="fp32", sharding="none", vf_coef=0.5,
                      cliprange=0.05, cliprange_value=0.05)
    gen = torch.Generator().manual_seed(0)
    rollout = hand_made_rollout(policy, gen)
    advantages, returns = torch.randn(4, 5, generator=gen) * rollout.mask, torch.randn(4, 5, generator=gen) * rollout.mask
    state = TrainingState(config, policy, None, make_optimizer(policy, cfg), LossScaler(False), "")
    metrics, grad_norm, _, _, _ = ppo_updates(state, rollout, advantages, returns, cfg, step=0, lr=cfg.lr, rank=0, world=1,
                                           device=torch.device("cpu"), log=print)
    losses, norms = reference_update(hf, value_head, rollout, advantages, returns, cfg, epochs=2)
    assert metrics["loss"].item() == pytest.approx(statistics.fmean(losses), rel=1e-5)
    assert grad_norm.item() == pytest.approx(norms[-1], rel=1e-5)
    assert norms[-1] > cfg.grad_clip  # the clip was exercised
    theirs = hf.state_dict() | {"score.weight": value_head.weight}
    differences, norms = [], []
    for name, tensor in policy.state_dict().items():
        reference = theirs[name].t() if name.endswith(CONV1D_SUFFIXES) else theirs[name]  # HF's Conv1D: (in, out)
        if name.endswith("c_attn.bias"):  # the keys' bias adds q . b to every score of a query: softmax ignores it,
            keep = torch.arange(96) // 32 != 1  # its gradient is 0 but for float noise, which Adam makes lr-sized steps
            tensor, reference = tensor[keep], reference[keep]
        # Per tensor 1e-4: a zero-initialised bias is its two Adam steps alone, each about lr * sign(g).
        assert (tensor - reference).norm() <= 1e-4 * reference.norm(), name
        differences.append((tensor - reference).flatten())
        norms.append(reference.flatten())
    assert torch.cat(differences).norm() <= 1e-5 * torch.cat(norms).norm()  # the weights, all together


# ----------------------------------------------------------------------------- the job

PPO_TINY = [*[a for a in TINY if not a.startswith(("--batch_size", "--micro_batch_size", "--max_steps", "--lr"))],
            "--batch_size=8", "--mini_batch_size=4", "--micro_batch_size=2", "--ppo_epochs=2", "--lr=1e-3",
            "--reward=vader", "--max_new_tokens=6", "--kl_coef=0.1", "--target_kl=1.0", "--kl_horizon=50"]


def eos_heavy_model(directory):
    """A tiny GPT-2 that ends a continuation with probability about 0.3 per token, whatever it reads:
    ln_f outputs its bias b alone (a unit vector), every other token's logit b . wte is about 0 and
    <|endoftext|>'s is log(0.3 / 0.7 * 50256)."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)).init_weights(seed=0)
    with torch.no_grad():
        direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
        direction /= direction.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[EOT_ID] = direction * math.log(0.3 / 0.7 * 50256)
    model.save_pretrained(str(directory))
    return directory


def ppo_run(out_dir, *extra, ranks=1):
    argv = ["ppo_train.py", *PPO_TINY, f"--out_dir={out_dir}", *extra]
    if ranks == 1:
        return warm.run(argv, timeout=300)
    return warm.wait_ranks(warm.ranks(argv, nproc_per_node=ranks), timeout=300)


def metrics_of(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def test_two_ranks_whose_samples_end_at_different_lengths_take_one_process_s_steps(tmp_path):
    """The rollout's continuations end at different lengths on each rank (the model ends one with
    probability ~0.3 a token): neither rank waits for the other (the run ends), and two ranks' steps
    are one process's: the same rollouts, rewards and losses, the same final weights."""
    model = eos_heavy_model(tmp_path / "eos_heavy")
    args = [f"--init_from={model}", "--max_steps=2", "--n_samples=0"]
    one = ppo_run(tmp_path / "one", *args)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    returncodes, output = ppo_run(tmp_path / "two", *args, ranks=2)
    assert returncodes == [0, 0], output[-3000:]
    one_lines, two_lines = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    lengths = [line["tokens/responses_len_mean"] for line in one_lines if "tokens/responses_len_mean" in line]
    assert len(lengths) == 2 and all(1 <= n < 5 for n in lengths)  # most rows ended early, unevenly
    for a, b in zip(one_lines, two_lines):
        assert a.keys() == b.keys()
        for key in a:
            if not key.endswith(("_s", "seconds", "peak_memory_gib")):  # times and memory differ, the steps not
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_ppo_gt_raises_the_held_out_reward_of_the_demo(demo_run, tmp_path):
    """PPO on the ground-truth reward (VADER), from the demo's SFT model: the held-out reward of the
    policy's samples rises, and its KL from the start grows from 0."""
    demo_dir, _ = demo_run
    result = ppo_run(tmp_path, f"--init_from={demo_dir / 'sft'}", "--n_embd=64", "--max_len=32",
                     "--max_prompt_len=16", "--eval_fraction=0.2", "--kl_samples=16", "--max_new_tokens=8",
                     "--batch_size=16", "--mini_batch_size=16", "--micro_batch_size=16", "--lr=5e-4", "--max_steps=4",
                     "--kl_coef=0.05", "--target_kl=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evals = [line for line in metrics_of(tmp_path) if "eval/reward" in line]
    assert evals[0]["step"] == 0 and evals[0]["eval/kl"] == 0.0
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"] + 0.15, (evals[0], evals[-1])  # measured: +0.32
    assert evals[-1]["eval/kl"] > 0.1
    card = (tmp_path / "final" / "README.md").read_text()
    assert "ppo_train.py" in card and json.load(open(tmp_path / "final" / "config.json"))["architectures"] == [
        "GPT2LMHeadModel"]  # the value head is not exported


def test_a_killed_ppo_run_resumes_to_the_uninterrupted_end(tmp_path):
    args = ["--max_steps=6", "--ckpt_every=2", "--sharding=none", "--n_samples=0", "--micro_batch_size=4"]
    uninterrupted = ppo_run(tmp_path / "whole", *args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    process = warm.popen(["ppo_train.py", *PPO_TINY, f"--out_dir={tmp_path / 'killed'}", *args])
    kill_when_logged(process, r"^step 3/6")
    assert process.returncode == -signal.SIGKILL
    relaunched = ppo_run(tmp_path / "killed", *args)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert re.search(r"resumed from .*step_000002 at step 2", relaunched.stdout)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # rollouts, kl_coef, score statistics
    whole = [m for m in metrics_of(tmp_path / "whole") if "loss" in m]
    killed = [m for m in metrics_of(tmp_path / "killed") if "loss" in m]
    assert [m["loss"] for m in whole] == [m["loss"] for m in killed]
    assert [m["objective/kl_coef"] for m in whole] == [m["objective/kl_coef"] for m in killed]


def test_ppo_refuses_bad_input_in_one_line_before_any_work(tmp_path):
    for extra, message in ((["--reward="], "objective=ppo needs a reward"),
                           (["--mini_batch_size=6"], "is not a multiple of mini_batch_size=6"),
                           (["--objective=dpo"], "objective=dpo is trained by fsdp_train.py")):
        result = ppo_run(tmp_path / "bad", *extra)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
        assert not (tmp_path / "bad").exists()


def test_a_rollout_is_the_same_whatever_its_micro_batches(one_process_group):
    """Each row's sampler draws come from (seed, step) and the row's place in the batch, so drawing the
    batch 2 rows at a time or 4 at a time samples the same continuations and scores them the same."""
    from train.rollout import make_rollout
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), score_head=True).init_weights(seed=0)
    reference = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).init_weights(seed=0)
    prompts = [[464, 3290, 373], [40], [1212, 318, 257, 1332], [464, 2068], [50, 51, 52], [9]]
    rollouts = [make_rollout(policy, reference, prompts, 1, TrainConfig(
        objective="ppo", reward="vader", batch_size=4, micro_batch_size=micro, max_new_tokens=5, sharding="none",
        precision="fp32"), 0, 1, torch.device("cpu")) for micro in (2, 4)]
    assert torch.equal(rollouts[0].responses, rollouts[1].responses) and torch.equal(rollouts[0].mask, rollouts[1].mask)
    assert rollouts[0].prompt_indices == rollouts[1].prompt_indices
    assert torch.allclose(rollouts[0].logps, rollouts[1].logps, atol=1e-5)
