"""evaluation.py's KL (the paper's: full per-position KLs summed along each sample) and its one-sample
estimate, against the exact KL of next-token distributions computed directly."""
import math

import pytest
import torch

from data.batches import Pair
from dpo import span_kl
from gpt2 import EOT_ID, GPT, GPTConfig
from train.config import TrainConfig
from train.evaluation import evaluate


def peaky_model(seed):
    """A small GPT-2 whose next-token distributions are far from uniform (large random weights)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=32)).init_weights(seed)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model.eval()


def test_kl_is_exact_and_the_one_sample_estimate_unbiased_for_the_policy_distribution(one_process_group):
    """With one sampled token per prompt, eval/kl is the exact KL(p || q) = sum_y p(y) (log p(y) -
    log q(y)) of the first next-token distributions, averaged over prompts; eval/kl_one_sample
    averages log p(y) - log q(y) over y ~ p, whose expectation is the same. Sampling at another
    temperature than 1 (the bug this guards against) moves the latter by many standard errors."""
    policy, reference = peaky_model(1), peaky_model(2)
    n_prompts = 256
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50256, (4,), generator=gen).tolist() for _ in range(n_prompts)]
    pairs = [Pair(prompt, [1], [2], group_index=i, chosen_index=0, rejected_index=1) for i, prompt in enumerate(prompts)]
    cfg = TrainConfig(max_new_tokens=1, kl_samples=n_prompts, micro_batch_size=64, temperature=0.7)
    metrics = evaluate(policy, reference, pairs, None, cfg, rank=0, world=1, device=torch.device("cpu"))

    with torch.no_grad():  # exact KL and the per-sample spread, from the next-token distributions
        log_p = policy(torch.tensor(prompts))[:, -1].double().log_softmax(-1)
        log_q = reference(torch.tensor(prompts))[:, -1].double().log_softmax(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)  # (n_prompts,)
    second_moment = (p * (log_p - log_q) ** 2).sum(-1)
    standard_error = math.sqrt((second_moment - kl ** 2).sum().item()) / n_prompts
    assert kl.mean().item() > 1.0  # the two models really differ
    assert metrics["eval/kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    estimate = metrics["eval/kl_one_sample"].item()
    assert abs(estimate - kl.mean().item()) < 4 * standard_error, (estimate, kl.mean().item(), standard_error)


def test_span_kl_sums_the_full_kl_of_each_position_to_the_first_end_of_text(monkeypatch):
    """Left-padded prompts of different lengths, continuations one of which ends early with
    <|endoftext|> (then padding): kl sums the exact per-position KL over each continuation's tokens up
    to and including that <|endoftext|>, log_ratio the sampled tokens' log-ratios, both against each
    row run alone without padding, in float64. In chunks of 5 positions (3 rows of 4 here: 2 forwards
    of each model, the second of 1 row), as long samples are computed."""
    monkeypatch.setattr("dpo.LOGSUMEXP_CHUNK", 5)
    policy, reference = peaky_model(1), peaky_model(2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50256, (n,), generator=gen).tolist() for n in (3, 1, 2)]
    continuations = [torch.randint(0, 50256, (4,), generator=gen).tolist() for _ in prompts]
    continuations[1][1] = EOT_ID  # row 1 ends at its second token; its last two columns are after it
    start = max(map(len, prompts))
    tokens = torch.tensor([[0] * (start - len(p)) + p + c for p, c in zip(prompts, continuations)])
    attention_mask = torch.tensor([[False] * (start - len(p)) + [True] * (len(p) + 4) for p in prompts])
    scored = [len(c) if EOT_ID not in c else c.index(EOT_ID) + 1 for c in continuations]
    token_mask = torch.tensor([[False] * start + [i < n for i in range(4)] for n in scored])
    attention_mask &= torch.cat([torch.ones(3, start, dtype=torch.bool), token_mask[:, start:]], dim=1)
    kl, log_ratio = span_kl(policy, reference, tokens, start, attention_mask, token_mask)

    for row, (prompt, continuation, n) in enumerate(zip(prompts, continuations, scored)):
        ids = torch.tensor([prompt + continuation[:n]])
        with torch.no_grad():
            log_p = policy(ids)[0, len(prompt) - 1:-1].double().log_softmax(-1)  # (n, V): what predicts each token
            log_q = reference(ids)[0, len(prompt) - 1:-1].double().log_softmax(-1)
        exact = (log_p.exp() * (log_p - log_q)).sum().item()
        sampled = torch.tensor(continuation[:n])[:, None]
        exact_log_ratio = (log_p.gather(-1, sampled) - log_q.gather(-1, sampled)).sum().item()
        assert kl[row].item() == pytest.approx(exact, rel=1e-5, abs=1e-4), row  # fp32 log-softmax of logits ~100
        assert log_ratio[row].item() == pytest.approx(exact_log_ratio, rel=1e-5, abs=1e-4), row
    assert scored == [4, 2, 4] and (kl > 0.1).all()  # the two models really differ


class RecordingReward:
    """A reward known by hand (characters of the continuation) that keeps what it was asked to score."""
    def __init__(self):
        self.calls = []

    def score(self, prompts, continuations):
        self.calls.append((list(prompts), list(continuations)))
        return [float(len(text)) for text in continuations]


def test_reward_is_the_mean_over_the_kl_samples_and_kl_of_the_reference_itself_is_zero(one_process_group, monkeypatch):
    from train import evaluation
    from data.tokenizer import decode
    recording = RecordingReward()
    monkeypatch.setitem(evaluation._reward_models, "recording", recording)
    policy = peaky_model(1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50256, (4,), generator=gen).tolist() for _ in range(12)]
    pairs = [Pair(prompt, [1], [2], group_index=i, chosen_index=0, rejected_index=1) for i, prompt in enumerate(prompts)]
    cfg = TrainConfig(max_new_tokens=5, kl_samples=8, micro_batch_size=4, reward="recording")
    metrics = evaluate(policy, policy, pairs, None, cfg, rank=0, world=1, device=torch.device("cpu"))
    assert metrics["eval/kl"].item() == metrics["eval/kl_one_sample"].item() == 0.0  # policy = reference: exactly 0
    (scored_prompts, continuations), = recording.calls
    assert scored_prompts == [decode(p) for p in prompts[:8]]  # one sample per held-out prompt, kl_samples of them
    # fewer held-out prompts than kl_samples: each prompt in turn, again
    cfg = TrainConfig(max_new_tokens=5, kl_samples=5, micro_batch_size=4, reward="recording")
    evaluate(policy, policy, pairs[:2], None, cfg, rank=0, world=1, device=torch.device("cpu"))
    assert recording.calls[1][0] == [decode(p) for p in prompts[:2] * 2 + prompts[:1]]
    assert all(0 < len(text) for text in continuations)
    assert metrics["eval/reward"].item() == sum(map(len, continuations)) / 8
