"""The reward model (objective: reward_model, DPO paper Eq. 2) against transformers'
GPT2ForSequenceClassification: its loss on the same weights, and its export scored by both."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from data.batches import collate_pairs, pairs_of
from data.formats import make_demo_groups
from dpo import reward_model_loss
from gpt2 import EOT_ID, GPT
from data.tokenizer import encode
from errors import ConfigError
from test_fsdp_train import run_python
from train.reward import fetch_reward, load_reward


def tiny_classifier(tmp_path):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, num_labels=1, pad_token_id=EOT_ID)
    torch.manual_seed(0)
    hf = GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "rm")
    return hf, GPT.from_pretrained(str(tmp_path / "rm"), score_head=True)


def test_reward_model_loss_is_bradley_terry_on_gpt2_for_sequence_classification(tmp_path):
    hf, ours = tiny_classifier(tmp_path)
    pairs = pairs_of(make_demo_groups(6))[:5]
    batch = collate_pairs(pairs)
    loss, metrics = reward_model_loss(ours, batch)

    def hf_score(tokens):  # one row alone, unpadded: nothing for the pooling to skip but a closing EOT
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0, 0]
    chosen = torch.stack([hf_score(p.prompt + p.chosen) for p in pairs])
    rejected = torch.stack([hf_score(p.prompt + p.rejected) for p in pairs])
    expected = -F.logsigmoid(chosen - rejected).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(metrics["rewards/margins"], (chosen - rejected).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["rewards/accuracies"] == (chosen > rejected).float().mean()
    loss.backward()  # the score head and the body both learn
    assert ours.score.weight.grad.abs().sum() > 0 and ours.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0


def test_a_trained_reward_model_exports_a_classifier_that_scores_as_it_does(tmp_path):
    out = tmp_path / "rm"
    result = run_python(out, "--objective=reward_model", "--max_steps=12", "--lr=3e-3", "--eval_fraction=0.1")
    final = out / "final"
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval/' in line]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9, result.stdout[-2000:]  # the demo's pairs are easy
    config = json.load(open(final / "config.json"))
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] == EOT_ID
    hf = GPT2ForSequenceClassification.from_pretrained(final).eval()
    reward = load_reward(f"rm:{final}")
    prompts = ["The movie was", "Honestly, the food", "I"]
    continuations = [" great fun, truly.<|endoftext|>", " bad", " think it was awful and I left early"]
    ours = reward.score(prompts, continuations)
    for prompt, continuation, score in zip(prompts, continuations, ours):
        with torch.no_grad():
            theirs = hf(torch.tensor([encode(prompt) + encode(continuation)])).logits[0, 0].item()
        assert score == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    assert "GPT2ForSequenceClassification" in (final / "README.md").read_text()


def test_rm_spec_refuses_a_language_model_folder(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="not a one-label GPT2ForSequenceClassification"):
        fetch_reward(f"rm:{tmp_path / 'lm'}")
    with pytest.raises(ConfigError, match="rm:"):
        fetch_reward(f"rm:{tmp_path / 'absent'}")
    tiny_classifier(tmp_path)
    assert fetch_reward(f"rm:{tmp_path / 'rm'}") == str(tmp_path / "rm")
