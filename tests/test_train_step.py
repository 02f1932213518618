"""The trainer's whole optimizer step against a straightforward one written here with transformers
(llm.c's habit): full logits, log_softmax, gather, the papers' losses, torch.optim.AdamW with the same
decay groups, gradient clipping. Same starting weights; loss, gradient norm and every updated
weight must agree in fp32. In-process, on a one-process gloo group (FSDP over one rank)."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from transformers import GPT2Config, GPT2LMHeadModel

from data.batches import collate, pairs_of
from data.formats import PreferenceGroup
from gpt2 import CONV1D_SUFFIXES
from train.config import TrainConfig
from train.distributed import build_training_state
from train.step import train_step

BETA, LR, GRAD_CLIP, WEIGHT_DECAY = 0.1, 1e-3, 0.05, 0.1  # the clip binds: the norm at init is larger


@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    path = tmp_path_factory.mktemp("oracle") / "hf"
    model.save_pretrained(path)
    return path


def preference_pairs():
    """Two prompts with three responses and two pairs each (one response shared by both pairs), so
    packed micro-batches hold one prompt's pairs; lengths differ, so rows are padded."""
    gen = torch.Generator().manual_seed(1)
    tokens = lambda n: torch.randint(0, 50256, (n,), generator=gen).tolist()  # noqa: E731
    groups = [PreferenceGroup(tokens(7), [tokens(5), tokens(3), tokens(6)], [(0, 1), (0, 2)], "a"),
              PreferenceGroup(tokens(4), [tokens(2), tokens(8), tokens(4)], [(2, 0), (1, 0)], "b")]
    return pairs_of(groups)


def hf_sequence_logp(model, prompt, response, average):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, :-1]  # (T-1, V): position t predicts token t + 1
    token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    response_logps = token_logps[len(prompt) - 1:]
    return response_logps.mean() if average else response_logps.sum()


def hf_step(path, micro_batches, loss_type):
    """The step as a reader of the papers would write it, pair by pair."""
    policy = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").train()
    reference = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval().requires_grad_(False)
    average = loss_type == "ipo"  # logps=auto: IPO's length-normalised log-probs
    total_loss = 0.0
    for pairs in micro_batches:
        losses = []
        for pair in pairs:
            h = (hf_sequence_logp(policy, pair.prompt, pair.chosen, average)
                 - hf_sequence_logp(reference, pair.prompt, pair.chosen, average)
                 - hf_sequence_logp(policy, pair.prompt, pair.rejected, average)
                 + hf_sequence_logp(reference, pair.prompt, pair.rejected, average))
            if loss_type == "sigmoid":
                losses.append(-F.logsigmoid(BETA * h))  # DPO Eq. 7
            else:
                losses.append((h - 1 / (2 * BETA)) ** 2)  # IPO Eq. 17
        loss = torch.stack(losses).mean() / len(micro_batches)
        loss.backward()
        total_loss += loss.item()
    params = list(policy.parameters())  # wte and the tied lm_head are one parameter
    grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    names = {id(p): name for name, p in policy.named_parameters()}
    grads = {names[id(p)]: p.grad.clone() for p in params}
    torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999)).step()
    return total_loss, grad_norm.item(), policy.state_dict(), grads


@pytest.mark.parametrize("sharding", ["full", "none"])
@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_train_step_equals_a_plain_transformers_step(one_process_group, hf_weights, loss_type, prefix_sharing,
                                                     sharding):
    cfg = TrainConfig(init_from=str(hf_weights), loss_type=loss_type, beta=BETA, lr=LR, grad_clip=GRAD_CLIP,
                      weight_decay=WEIGHT_DECAY, precision="fp32", device="cpu", sharding=sharding,
                      prefix_sharing=prefix_sharing, batch_size=4, micro_batch_size=2)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",)) if sharding == "full" else None
    state = build_training_state(cfg, 0, torch.device("cpu"), mesh)
    pairs = preference_pairs()
    micro_pairs = [pairs[:2], pairs[2:]]  # two micro-batches of accumulation, one prompt each
    micro_batches = [collate(p, share_prompt=prefix_sharing) for p in micro_pairs]
    if prefix_sharing:  # each prompt ran once, its shared response once
        assert [b.input_ids.size(0) for b in micro_batches] == [1, 1]
        assert [len(b.slot_lengths) for b in micro_batches] == [3, 3]

    metrics, grad_norm, applied, _ = train_step(state.policy, state.reference, state.optimizer,
                                                        micro_batches, cfg, LR, state.scaler)
    expected_loss, expected_norm, expected_weights, expected_grads = hf_step(hf_weights, micro_pairs, loss_type)

    assert applied
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert float(grad_norm) == pytest.approx(expected_norm, rel=1e-5)
    assert expected_norm > 2 * GRAD_CLIP  # the clip was applied, so it is tested too
    ours = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in state.policy.state_dict().items()}
    compared = 0
    for name, expected in expected_weights.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte; causal-mask buffers
        got = ours[name].t() if name.endswith(CONV1D_SUFFIXES) else ours[name]
        # Adam's first step moves each weight by lr * g / (|g| + eps), eps = 1e-8, which is steep where
        # |g| is near eps: float noise in g (from cancelling terms; the key biases' gradient is exactly 0
        # in exact arithmetic) moves such weights visibly. So the tolerance is what a 1e-5 error in g,
        # relative to the tensor's largest gradient, can do through that step (at most 2 lr, a flipped
        # sign), plus 1e-5 relative on the weight.
        grad = expected_grads[name].abs()
        grad_error = 1e-5 * grad.max()
        step_error = LR * torch.clamp(grad_error * 1e-8 / (grad + 1e-8) ** 2, max=2.0)
        tolerance = 1e-5 * expected.abs() + 1e-5 * LR + step_error
        assert ((got - expected).abs() <= tolerance).all(), (name, (got - expected).abs().max().item())
        compared += 1
    assert compared == 4 + 12 * 2  # wte, wpe, ln_f weight and bias; 12 tensors per block


def test_text_records_train_as_trl_tokenizes_them(one_process_group, hf_weights, tmp_path):
    """Preference texts through the jsonl loader give TRL's token ids for GPT-2 (prompt ids as
    tokenized, each response's ids + <|endoftext|> 50256, scored), and the trainer's step on them
    equals the plain transformers step on those ids."""
    import json
    import os

    import tiktoken

    from data.formats import load_preferences
    from data.batches import Pair
    shared_cache = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tiktoken_cache")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(shared_cache):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(shared_cache)
    encoding = tiktoken.get_encoding("gpt2")
    texts = [("The film was", " a delight from start to end.", " a mess."),
             ("The film was", " fun.", " a mess."),
             ("Dinner last night", " was lovely.", " was cold and late.")]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in texts))
    groups, _ = load_preferences("jsonl", str(path))
    pairs = pairs_of(groups)
    trl_ids = [(encoding.encode(p), encoding.encode(c) + [50256], encoding.encode(r) + [50256]) for p, c, r in texts]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == trl_ids

    cfg = TrainConfig(init_from=str(hf_weights), beta=BETA, lr=LR, grad_clip=GRAD_CLIP, weight_decay=WEIGHT_DECAY,
                      precision="fp32", device="cpu", sharding="none", batch_size=3, micro_batch_size=3)
    state = build_training_state(cfg, 0, torch.device("cpu"), None)
    metrics, grad_norm, _, _ = train_step(state.policy, state.reference, state.optimizer,
                                                  [collate(pairs, share_prompt=True)], cfg, LR, state.scaler)
    trl_pairs = [Pair(*ids, group_index=i, chosen_index=0, rejected_index=1) for i, ids in enumerate(trl_ids)]
    expected_loss, expected_norm, _, _ = hf_step(hf_weights, [trl_pairs], "sigmoid")
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert float(grad_norm) == pytest.approx(expected_norm, rel=1e-5)
