"""dpo.py against the paper formulas, written out by hand with `math` (never by calling dpo.py)."""
import math

import pytest
import torch

from dpo import PairLogps, dpo_loss, preference_loss, preference_metrics


def log_sigmoid(x):
    # stable scalar log sigmoid(x) = -log(1 + exp(-x)), for hand-computed expectations
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


def logps(*values, dtype=torch.float32, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


# --- losses

# Three pairs, as (policy_chosen, policy_rejected, reference_chosen, reference_rejected).
# h = (pc - rc) - (pr - rr): 1.5, -2.75, 0.0
PAIRS = [(-10.0, -12.0, -11.0, -11.5), (-20.0, -18.0, -19.5, -20.25), (-5.0, -5.0, -5.0, -5.0)]
HS = [1.5, -2.75, 0.0]


def pair_tensors(pairs=PAIRS, **kw):
    return [logps(*column, **kw) for column in zip(*pairs)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_is_dpo_eq7(beta):
    losses, _, _ = preference_loss(*pair_tensors(), beta=beta)
    expected = [-math.log(1 / (1 + math.exp(-beta * h))) for h in HS]
    assert losses.dtype == torch.float32 and losses.shape == (3,)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert losses[2].item() == pytest.approx(math.log(2))  # h = 0: the model is indifferent


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_sigmoid_with_label_smoothing_is_cdpo(eps):
    beta = 0.5
    losses, _, _ = preference_loss(*pair_tensors(), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in HS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_is_chowdhury_unbiased_loss(eps):
    beta = 0.5
    losses, _, _ = preference_loss(*pair_tensors(), beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in HS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_robust_with_no_noise_is_dpo():
    sigmoid_losses, _, _ = preference_loss(*pair_tensors(), beta=0.3)
    robust_losses, _, _ = preference_loss(*pair_tensors(), beta=0.3, loss_type="robust")
    torch.testing.assert_close(robust_losses, sigmoid_losses, rtol=0, atol=0)
    assert robust_losses.tolist() == pytest.approx([-log_sigmoid(0.3 * h) for h in HS], rel=1e-6)


def test_robust_is_unbiased_under_label_flips():
    # Chowdhury et al.'s point: if each label is flipped with probability eps, the expected robust
    # loss equals the clean DPO loss. Flipping a label swaps chosen and rejected.
    beta, eps = 0.5, 0.2
    pc, pr, rc, rr = pair_tensors()
    robust, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    robust_flipped, _, _ = preference_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    expected_loss = (1 - eps) * robust + eps * robust_flipped
    assert expected_loss.tolist() == pytest.approx([-log_sigmoid(beta * h) for h in HS], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_is_azar_eq17(beta):
    losses, _, _ = preference_loss(*pair_tensors(), beta=beta, loss_type="ipo")
    expected = [(h - 1 / (2 * beta)) ** 2 for h in HS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge_is_slic(beta):
    losses, _, _ = preference_loss(*pair_tensors(), beta=beta, loss_type="hinge")
    expected = [max(0.0, 1 - beta * h) for h in HS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    if beta == 2.0:
        assert losses[0].item() == 0.0  # beta * h = 3 > 1: past the margin, no loss


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_reference_free_takes_reference_logps_as_zero(loss_type):
    beta = 0.5
    pc, pr, rc, rr = pair_tensors()
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                               reference_free=True)
    hs = [c - r for c, r in zip(pc.tolist(), pr.tolist())]  # 2.0, -2.0, 0.0
    expected = {"sigmoid": [-log_sigmoid(beta * h) for h in hs],
                "ipo": [(h - 1 / (2 * beta)) ** 2 for h in hs],
                "hinge": [max(0.0, 1 - beta * h) for h in hs]}[loss_type]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([beta * c for c in pc.tolist()])
    assert rejected_rewards.tolist() == pytest.approx([beta * r for r in pr.tolist()])
    # the reference tensors are not needed at all
    losses_no_ref, _, _ = preference_loss(pc, pr, None, None, beta=beta, loss_type=loss_type, reference_free=True)
    torch.testing.assert_close(losses_no_ref, losses)


def test_rewards_are_beta_times_logratio_and_detached():
    beta = 0.25
    pc, pr, rc, rr = pair_tensors(requires_grad=True)
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=beta)
    assert chosen_rewards.tolist() == pytest.approx([beta * (p - r) for p, _, r, _ in PAIRS])
    assert rejected_rewards.tolist() == pytest.approx([beta * (p - r) for _, p, _, r in PAIRS])
    assert chosen_rewards.dtype == rejected_rewards.dtype == torch.float32
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and chosen_rewards.grad_fn is None
    assert not rejected_rewards.requires_grad and rejected_rewards.grad_fn is None


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_gradient_identity(beta):
    # d/d pc [-log sigmoid(beta h)] = -beta sigmoid(-beta h); d/d pr = +beta sigmoid(-beta h)
    pc, pr, rc, rr = pair_tensors(requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weights = [beta * sigmoid(-beta * h) for h in HS]
    assert pc.grad.tolist() == pytest.approx([-w for w in weights], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx(weights, rel=1e-5)
    assert rc.grad.tolist() == pytest.approx(weights, rel=1e-5)  # the reference enters with the opposite sign
    assert rr.grad.tolist() == pytest.approx([-w for w in weights], rel=1e-5)


# beta * h = +-1e4 (fp32), and +-8192 from bf16 inputs (exactly representable in bf16).
LIMITS = [(torch.float32, 0.5, 2e4), (torch.float32, 0.5, -2e4), (torch.bfloat16, 1.0, 8192.0),
          (torch.bfloat16, 1.0, -8192.0)]


@pytest.mark.parametrize("dtype,beta,h", LIMITS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0),
                                           ("hinge", 0.0)])
def test_extreme_margins_give_finite_losses_and_gradients(dtype, beta, h, loss_type, eps):
    pc, pr = logps(0.0, dtype=dtype, requires_grad=True), logps(-h, dtype=dtype, requires_grad=True)
    rc, rr = logps(0.0, dtype=dtype), logps(0.0, dtype=dtype)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    z = beta * h  # |z| is 1e4 or 8192: sigmoid(-|z|) underflows to 0, so -log sigmoid(z) = max(0, -z)
    expected = {
        "sigmoid": (1 - eps) * max(0.0, -z) + eps * max(0.0, z),
        "robust": ((1 - eps) * max(0.0, -z) - eps * max(0.0, z)) / (1 - 2 * eps),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - z),
    }[loss_type]
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    if loss_type == "sigmoid" and eps == 0.0:
        # right side: no gradient left; wrong side: the full -beta pull on the chosen log-prob
        assert pc.grad.item() == pytest.approx(0.0 if z > 0 else -beta, abs=1e-6)


def test_bf16_inputs_are_upcast_before_subtracting():
    # In bf16, -256 - (-1.0078125) rounds to -255; in fp32 it is exactly -254.9921875.
    beta = 0.5
    pc, pr, rc, rr = (logps(v, dtype=torch.bfloat16) for v in (-256.0, 0.0, -1.0078125, 0.0))
    losses, chosen_rewards, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = -256.0 + 1.0078125
    assert losses.dtype == chosen_rewards.dtype == torch.float32
    assert losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)  # 65532.00006; bf16 math gives 65536
    assert chosen_rewards.item() == beta * h


INVALID = [
    (dict(loss_type="kto"), r"unknown loss_type 'kto'.*sigmoid, robust, ipo, hinge"),
    (dict(beta=0.0), r"beta .* got 0\.0"),
    (dict(beta=-0.1), r"beta .* got -0\.1"),
    (dict(beta=float("nan")), r"beta .* got nan"),
    (dict(beta=float("inf")), r"beta .* got inf"),
    (dict(label_smoothing=0.5), r"label_smoothing .* got 0\.5"),
    (dict(label_smoothing=-0.1), r"label_smoothing .* got -0\.1"),
    (dict(label_smoothing=float("nan")), r"label_smoothing .* got nan"),
    (dict(loss_type="ipo", label_smoothing=0.1), r"label_smoothing=0\.1 is not defined for loss_type 'ipo'"),
    (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing=0\.1 is not defined for loss_type 'hinge'"),
]


@pytest.mark.parametrize("kwargs,message", INVALID)
def test_invalid_arguments_raise_with_the_bad_value(kwargs, message):
    kwargs = {"beta": 0.1} | kwargs
    with pytest.raises(ValueError, match=message):
        preference_loss(*pair_tensors(), **kwargs)


def test_shape_mismatch_raises_with_the_shapes():
    pc, pr, rc, rr = pair_tensors()
    with pytest.raises(ValueError, match=r"'reference_rejected_logps': \(2,\)"):
        preference_loss(pc, pr, rc, rr[:2], beta=0.1)
    with pytest.raises(ValueError, match=r"same shape \(B,\).*\(3, 1\)"):
        preference_loss(pc[:, None], pr[:, None], rc[:, None], rr[:, None], beta=0.1)


def test_missing_reference_raises_and_points_at_reference_free():
    pc, pr, _, rr = pair_tensors()
    with pytest.raises(ValueError, match=r"reference_chosen_logps .* got NoneType.*reference_free=True"):
        preference_loss(pc, pr, None, rr, beta=0.1)


# --- metrics

def test_metrics_names_and_values_on_a_hand_made_batch():
    losses = logps(0.5, 1.5, 1.0, 3.0, requires_grad=True)
    policy = PairLogps(chosen=logps(-10.0, -20.0, -30.0, -40.0, dtype=torch.bfloat16, requires_grad=True),
                       rejected=logps(-12.0, -22.0, -32.0, -42.0, requires_grad=True),
                       chosen_tokens=logps(1, 2, 3, 4), rejected_tokens=logps(1, 1, 1, 1),
                       chosen_logits=logps(2.0, 4.0, 6.0, 8.0), rejected_logits=logps(1.0, 1.0, 1.0, 1.0))
    reference_chosen, reference_rejected = logps(-10.5, -19.0, -33.0, -40.0), logps(-11.5, -23.0, -33.0, -42.0)
    # beta * (policy - reference): chosen 0.25, -0.5, 1.5, 0; rejected -0.25, 0.5, 0.5, 0. Chosen wins on
    # pairs 0 and 2; pair 3 is a tie, not a win
    metrics = preference_metrics(losses, policy, reference_chosen, reference_rejected, beta=0.5)
    assert list(metrics) == ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert value.dtype == torch.float32 and not value.requires_grad, name
    expected = {"loss": 1.5, "rewards/chosen": 0.3125, "rewards/rejected": 0.1875, "rewards/accuracies": 0.5,
                "rewards/margins": 0.125, "logps/chosen": -25.0, "logps/rejected": -27.0,
                "logits/chosen": 20 / 10, "logits/rejected": 1.0}  # over all scored tokens of the batch, as TRL's
    assert {name: value.item() for name, value in metrics.items()} == pytest.approx(expected)


def test_ipo_trains_on_per_token_averages_and_logs_summed_rewards():
    """logps=auto under IPO: the loss takes log-probs averaged per token (IPO Eq. 17 on length-
    normalised log-probs); rewards/* and logps/* stay summed, as TRL logs them."""
    policy = PairLogps(chosen=logps(-6.0, -9.0), rejected=logps(-8.0, -4.0), chosen_tokens=logps(3, 3),
                       rejected_tokens=logps(2, 4), chosen_logits=logps(0.0, 0.0), rejected_logits=logps(0.0, 0.0))
    reference_chosen, reference_rejected = logps(-7.5, -9.0), logps(-7.0, -6.0)
    beta = 0.25
    losses, metrics = dpo_loss(policy, reference_chosen, reference_rejected, beta=beta, loss_type="ipo", average=True)
    h = [(-6 / 3 + 7.5 / 3) - (-8 / 2 + 7 / 2), (-9 / 3 + 9 / 3) - (-4 / 4 + 6 / 4)]  # per-token log-ratios
    assert losses.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h])
    assert metrics["rewards/chosen"].item() == pytest.approx(beta * (1.5 + 0.0) / 2)  # summed: -6 - (-7.5), 0
    assert metrics["rewards/rejected"].item() == pytest.approx(beta * (-1.0 + 2.0) / 2)
    assert metrics["logps/chosen"].item() == pytest.approx(-7.5)


def test_preference_loss_keeps_fp64():
    """fp64 log-probs are computed in fp64: a margin of 1e-9 nats on log-probs near -1000 is lost in fp32."""
    pc, pr = torch.tensor([-1000.0 + 1e-9], dtype=torch.float64), torch.tensor([-1000.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    losses, chosen_rewards, _ = preference_loss(pc, pr, zero, zero, beta=1.0)
    assert losses.dtype == chosen_rewards.dtype == torch.float64
    h = (-1000.0 + 1e-9) - (-1000.0)  # python floats are fp64
    assert losses.item() == pytest.approx(math.log1p(math.exp(-h)), rel=0, abs=1e-15)
    assert losses.item() != pytest.approx(math.log(2), rel=0, abs=1e-15)  # what fp32 gives: h rounds to 0


# --- log-probs

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from dpo import concatenated_logps, response_logps, token_logps  # noqa: E402
from gpt2 import GPT  # noqa: E402


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128)).eval()
    path = tmp_path_factory.mktemp("logps") / "hf"
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(str(path))


def prompt_response_batch(side, prompt_lengths=(7, 3, 12), response_lengths=(5, 9, 2)):
    """Random token rows of prompt + response, padded on `side`; masks as data/ builds them."""
    gen = torch.Generator().manual_seed(5)
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    T = max(lengths)
    input_ids = torch.full((len(lengths), T), 50256)
    attention_mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    response_mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        start = 0 if side == "right" else T - p - r
        input_ids[row, start:start + p + r] = torch.randint(0, 50257, (p + r,), generator=gen)
        attention_mask[row, start:start + p + r] = True
        response_mask[row, start + p:start + p + r] = True
    return input_ids, attention_mask, response_mask


def reference_logps_from_transformers(hf, input_ids, attention_mask, response_mask):
    """The quantity written the plain way: full logits, fp64 log_softmax, gather, masked sum."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(input_ids, attention_mask=attention_mask.long(), position_ids=position_ids).logits
    logprobs = logits[:, :-1].double().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logprobs * response_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_logps_match_transformers(hf_and_ours, side):
    hf, ours = hf_and_ours
    input_ids, attention_mask, response_mask = prompt_response_batch(side)
    expected = reference_logps_from_transformers(hf, input_ids, attention_mask, response_mask)
    with torch.no_grad():
        # right padding needs no attention mask; left padding does (and positions from it)
        got = response_logps(ours, input_ids, response_mask, attention_mask if side == "left" else None)
        got_mean = response_logps(ours, input_ids, response_mask, attention_mask, average=True)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=0)
    assert torch.allclose(got_mean.double(), expected / response_mask.sum(-1), rtol=1e-5, atol=0)


def test_concatenated_forward_matches_transformers_on_each_sequence(hf_and_ours):
    """collate_pairs' 2B right-padded rows in one forward: each pair's chosen and rejected log-prob
    equals transformers on prompt + response alone; SFT's chosen-only forward gives the same chosen."""
    from data.batches import Pair, collate_pairs
    from dpo import sft_loss
    hf, ours = hf_and_ours
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 3, 10), (6, 8, 2)]  # (prompt, chosen, rejected) lengths
    pairs = [Pair(*(torch.randint(0, 50257, (n,), generator=gen).tolist() for n in shape), group_index=i,
                  chosen_index=0, rejected_index=1) for i, shape in enumerate(shapes)]
    batch = collate_pairs(pairs)
    with torch.no_grad():
        both = concatenated_logps(ours, batch)
        loss, metrics = sft_loss(ours, batch)
    assert_each_pair_matches_transformers_alone(hf, pairs, both.chosen, both.rejected)
    assert both.chosen_tokens.tolist() == [3, 8] and both.rejected_tokens.tolist() == [10, 2]
    assert loss.item() == pytest.approx(-both.chosen.sum().item() / 11, rel=1e-6)
    assert metrics["logps/chosen"].item() == pytest.approx(both.chosen.mean().item(), rel=1e-6)


def test_the_step_hands_the_model_index_tensors_built_in_collate(hf_and_ours, monkeypatch):
    """No data-dependent shapes inside the step (each would make a GPU wait for the host): every
    path (packed, unpacked, SFT, the KL's sampled span) gives the model long index tensors, and the
    training paths give it exactly the ones collate built."""
    from data.batches import Pair, collate_pairs, collate_pairs_shared_prompt
    from dpo import sft_loss, span_kl
    _, ours = hf_and_ours
    seen = []
    forward = type(ours).forward

    def recording_forward(self, input_ids, *args, logits_at=None, **kwargs):
        seen.append(logits_at)
        return forward(self, input_ids, *args, logits_at=logits_at, **kwargs)

    monkeypatch.setattr(type(ours), "forward", recording_forward)
    pairs = [Pair([5, 6, 7], [8, 9], [10], 0, 0, 1), Pair([11], [12, 13, 14], [15, 16], 1, 0, 1)]
    unpacked, packed = collate_pairs(pairs), collate_pairs_shared_prompt(pairs)
    with torch.no_grad():
        concatenated_logps(ours, unpacked)
        concatenated_logps(ours, packed)
        sft_loss(ours, unpacked)
        tokens = torch.randint(0, 50257, (2, 6))
        span_kl(ours, ours, tokens, 3, torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool))
    assert all(index.dtype == torch.long for index in seen)
    assert seen[0] is unpacked.predictor_index and seen[1] is packed.predictor_index
    assert seen[2].data_ptr() == unpacked.predictor_index.data_ptr()  # a view of it: the chosen rows' first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_value_and_gradient_equal_log_softmax(dtype, monkeypatch):
    monkeypatch.setattr("dpo.LOGSUMEXP_CHUNK", 7)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(20, 301, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 301, (20,), generator=gen)
    weights = torch.randn(20, generator=gen)
    ours_in = logits.clone().requires_grad_()
    naive_in = logits.double().requires_grad_()
    ours = token_logps(ours_in, targets)
    naive = naive_in.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (ours * weights).sum().backward()
    (naive * weights.double()).sum().backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), naive, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours_in.grad.double(), naive_in.grad, rtol=0, atol=tol)


def test_response_logps_backward_matches_transformers_gradient(hf_and_ours):
    hf, ours = hf_and_ours
    input_ids, attention_mask, response_mask = prompt_response_batch("right")
    response_logps(ours, input_ids, response_mask).sum().backward()
    logits = hf(input_ids).logits
    (logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1) * response_mask[:, 1:]).sum().backward()
    ours_grad = ours.transformer.h[0].attn.c_attn.weight.grad
    hf_grad = hf.transformer.h[0].attn.c_attn.weight.grad.t()  # Conv1D is transposed
    assert torch.allclose(ours_grad, hf_grad, rtol=1e-4, atol=1e-6)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)


def saved_bytes_for_backward(fn):
    """Bytes of all tensors autograd saves while fn runs (distinct storages counted once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_logps_memory_does_not_grow_with_vocab_times_prompt_length(hf_and_ours):
    """Growing the prompt from 8 to 96 tokens (same 8-token responses) must not add memory in
    proportion to T x vocab: the naive full log-softmax adds 88 x 50257 x 4 bytes per row."""
    _, ours = hf_and_ours
    V, B, response_len = 50257, 4, 8

    def batch(prompt_len):
        ids = torch.randint(0, V, (B, prompt_len + response_len), generator=torch.Generator().manual_seed(0))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt_len:] = True
        return ids, mask

    def ours_bytes(prompt_len):
        ids, mask = batch(prompt_len)
        return saved_bytes_for_backward(lambda: response_logps(ours, ids, mask))

    def naive_bytes(prompt_len):
        ids, mask = batch(prompt_len)

        def naive():
            logprobs = ours(ids)[:, :-1].float().log_softmax(-1)
            return (logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
        return saved_bytes_for_backward(naive)

    vocab_rows_added = 88 * B * V * 4
    assert naive_bytes(96) - naive_bytes(8) >= vocab_rows_added  # the effect being avoided is real
    assert ours_bytes(96) - ours_bytes(8) < 0.05 * vocab_rows_added
    ours.zero_grad(set_to_none=True)


def assert_each_pair_matches_transformers_alone(hf, pairs, chosen, rejected):
    """Each pair's chosen and rejected log-prob against transformers run on prompt + response alone."""
    for i, pair in enumerate(pairs):
        for response, got in ((pair.chosen, chosen[i]), (pair.rejected, rejected[i])):
            ids = torch.tensor([pair.prompt + response])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(pair.prompt):] = True
            expected = reference_logps_from_transformers(hf, ids, torch.ones_like(mask), mask)
            assert torch.allclose(got.double(), expected[0], rtol=1e-5, atol=0)


def test_shared_prompt_packing_gives_the_same_logps_as_separate_sequences(hf_and_ours):
    """One packed row [prompt | chosen | rejected] per pair against transformers run on each
    prompt+response sequence alone (prompts and responses of different lengths in one batch)."""
    from data.batches import Pair, collate_pairs_shared_prompt
    hf, ours = hf_and_ours
    gen = torch.Generator().manual_seed(7)
    shapes = [(5, 3, 6), (9, 7, 2), (1, 4, 4)]  # (prompt, chosen, rejected) lengths
    pairs = [Pair(*(torch.randint(0, 50257, (n,), generator=gen).tolist() for n in shape), group_index=i, chosen_index=0, rejected_index=1)
             for i, shape in enumerate(shapes)]
    batch = collate_pairs_shared_prompt(pairs)
    assert batch.input_ids.shape == (3, 18)  # 9 + 7 + 2, not two rows of 16 and 11
    with torch.no_grad():
        both = concatenated_logps(ours, batch)
        chosen, rejected = both.sequence_logps(average=False)
        chosen_mean, _ = both.sequence_logps(average=True)
    assert_each_pair_matches_transformers_alone(hf, pairs, chosen, rejected)
    for i, pair in enumerate(pairs):
        assert torch.allclose(chosen_mean[i], chosen[i] / len(pair.chosen))


def test_shared_prompt_gradients_equal_the_plain_path(hf_and_ours):
    from data.batches import Pair, collate_pairs, collate_pairs_shared_prompt
    _, ours = hf_and_ours
    gen = torch.Generator().manual_seed(8)
    pairs = [Pair(*(torch.randint(0, 50257, (n,), generator=gen).tolist() for n in shape), group_index=i, chosen_index=0, rejected_index=1)
             for i, shape in enumerate([(6, 4, 5), (3, 8, 1)])]
    grads = []
    for batch in (collate_pairs(pairs), collate_pairs_shared_prompt(pairs)):
        chosen, rejected = concatenated_logps(ours, batch).sequence_logps(average=False)
        (chosen - 2 * rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
        ours.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_groups_pairs_share_one_packed_row_and_keep_their_logps(hf_and_ours):
    """Three pairs of one prompt with 4 responses (lm-human-preferences' shape) and a lone pair:
    two packed rows, each response once, log-probs equal to transformers on each sequence alone."""
    from data.batches import collate_pairs_shared_prompt, pairs_of
    from data.formats import PreferenceGroup
    hf, ours = hf_and_ours
    gen = torch.Generator().manual_seed(9)
    ids = lambda n: torch.randint(0, 50257, (n,), generator=gen).tolist()  # noqa: E731
    groups = [PreferenceGroup(ids(6), [ids(4), ids(3), ids(5), ids(2)], [(2, 0), (2, 1), (2, 3)], "q0"),
              PreferenceGroup(ids(3), [ids(2), ids(4)], [(1, 0)], "q1")]
    pairs = pairs_of(groups)
    pairs = [pairs[0], pairs[3], pairs[1], pairs[2]]  # the groups interleaved, as a shuffled batch has them
    batch = collate_pairs_shared_prompt(pairs)
    assert batch.input_ids.shape == (2, 6 + 4 + 3 + 5 + 2)  # one row per prompt, each response once
    assert len(batch.slot_lengths) == 6
    with torch.no_grad():
        both = concatenated_logps(ours, batch)
    assert_each_pair_matches_transformers_alone(hf, pairs, both.chosen, both.rejected)
    # TRL's logits/chosen: the mean logit (over the vocabulary and every scored chosen token of the batch)
    for side, responses in (("chosen", [p.chosen for p in pairs]), ("rejected", [p.rejected for p in pairs])):
        total, n_tokens = 0.0, 0
        for pair, response in zip(pairs, responses):
            with torch.no_grad():
                hf_logits = hf(torch.tensor([pair.prompt + response])).logits[0].double()  # (T, V)
            total += hf_logits[len(pair.prompt) - 1:-1].mean(-1).sum().item()  # rows predicting the response
            n_tokens += len(response)
        metrics = preference_metrics(torch.zeros(len(pairs)), both, None, None, beta=0.1)
        assert metrics[f"logits/{side}"].item() == pytest.approx(total / n_tokens, rel=1e-5)


def test_unlikelihood_is_welleck_token_unlikelihood_on_the_rejected_response(hf_and_ours):
    """The paper's unlikelihood baseline written out on transformers' probabilities: the chosen
    tokens' mean negative log-likelihood plus alpha times the rejected tokens' mean -log(1 - p), each
    sequence alone (Welleck et al. 2019, Eq. 4); and its gradient, against autograd through it."""
    from data.batches import Pair, collate_pairs
    from dpo import unlikelihood_loss
    hf, ours = hf_and_ours
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 3, 10), (6, 8, 2)]  # (prompt, chosen, rejected) lengths
    pairs = [Pair(*(torch.randint(0, 50257, (n,), generator=gen).tolist() for n in shape), group_index=i,
                  chosen_index=0, rejected_index=1) for i, shape in enumerate(shapes)]
    alpha = 0.5

    def token_probs(model, prompt, response):  # p(response_t | prompt, response_<t), every t, fp64
        ids = torch.tensor([prompt + response])
        out = model(ids)
        logits = getattr(out, "logits", out)  # transformers' output, or our logits
        return logits[0, len(prompt) - 1:-1].double().softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)

    chosen = torch.cat([token_probs(hf, p.prompt, p.chosen) for p in pairs])
    rejected = torch.cat([token_probs(hf, p.prompt, p.rejected) for p in pairs])
    expected = -chosen.log().mean() - alpha * (1 - rejected).log().mean()
    loss, metrics = unlikelihood_loss(ours, collate_pairs(pairs), alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["nll/chosen"].item() == pytest.approx(-chosen.log().mean().item(), rel=1e-5)
    loss.backward()
    got = {name: p.grad.clone() for name, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    direct = -torch.cat([token_probs(ours, p.prompt, p.chosen) for p in pairs]).log().mean() - alpha * (
        1 - torch.cat([token_probs(ours, p.prompt, p.rejected) for p in pairs])).log().mean()
    direct.backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6)  # fp32 here, fp64 softmax there
    ours.zero_grad(set_to_none=True)
