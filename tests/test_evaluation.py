"""evaluation.py's KL estimate against the exact KL of next-token distributions."""
import math

import torch

from data.batches import Pair
from gpt2 import GPT, GPTConfig
from train.config import TrainConfig
from train.evaluation import evaluate


def peaky_model(seed):
    """A small GPT-2 whose next-token distributions are far from uniform (large random weights)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=32)).init_weights(seed)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model.eval()


def test_kl_estimate_is_unbiased_for_the_policy_distribution(one_process_group):
    """With one sampled token per prompt, eval/kl averages log p(y) - log q(y) over y ~ p, whose
    expectation is the exact KL(p || q) = sum_y p(y) (log p(y) - log q(y)). Sampling at another
    temperature than 1 (the bug this guards against) moves the estimate by many standard errors."""
    policy, reference = peaky_model(1), peaky_model(2)
    n_prompts = 256
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50256, (4,), generator=gen).tolist() for _ in range(n_prompts)]
    pairs = [Pair(prompt, [1], [2], group_index=i, chosen_index=0, rejected_index=1) for i, prompt in enumerate(prompts)]
    cfg = TrainConfig(max_new_tokens=1, kl_samples=n_prompts, micro_batch_size=64, temperature=0.7)
    estimate = evaluate(policy, reference, pairs, None, cfg, rank=0, world=1, device=torch.device("cpu"))["eval/kl"].item()

    with torch.no_grad():  # exact KL and the per-sample spread, from the next-token distributions
        log_p = policy(torch.tensor(prompts))[:, -1].double().log_softmax(-1)
        log_q = reference(torch.tensor(prompts))[:, -1].double().log_softmax(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)  # (n_prompts,)
    second_moment = (p * (log_p - log_q) ** 2).sum(-1)
    standard_error = math.sqrt((second_moment - kl ** 2).sum().item()) / n_prompts
    assert kl.mean().item() > 1.0  # the two models really differ
    assert abs(estimate - kl.mean().item()) < 4 * standard_error, (estimate, kl.mean().item(), standard_error)


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
    assert metrics["eval/kl"].item() == 0.0  # policy = reference: every log-ratio is exactly 0
    (scored_prompts, continuations), = recording.calls
    assert scored_prompts == [decode(p) for p in prompts[:8]]  # one sample per held-out prompt, kl_samples of them
    # fewer held-out prompts than kl_samples: each prompt in turn, again
    cfg = TrainConfig(max_new_tokens=5, kl_samples=5, micro_batch_size=4, reward="recording")
    evaluate(policy, policy, pairs[:2], None, cfg, rank=0, world=1, device=torch.device("cpu"))
    assert recording.calls[1][0] == [decode(p) for p in prompts[:2] * 2 + prompts[:1]]
    assert all(0 < len(text) for text in continuations)
    assert metrics["eval/reward"].item() == sum(map(len, continuations)) / 8
