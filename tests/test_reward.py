"""The ground-truth reward (reward.py) against hand-scored texts and transformers run directly; the
pair-generation step (generate_pairs.py): counts, ordering, ties, determinism."""
import importlib.util
import json

import pytest
import torch

from errors import ConfigError, DataError
from data.records import read_prompts
from generate_pairs import generate_pairs, ranked_pairs
from gpt2 import GPT, GPTConfig
from train import reward as reward_module
from train.export import write_tokenizer_files


# ----------------------------------------------------------------------------- VADER

def test_vader_scores_hand_labelled_continuations_by_their_sentiment():
    vader = reward_module.load_reward("vader")
    positive = [" wonderful, I loved it.", " great and I enjoyed it.", " superb, truly a joy."]
    negative = [" terrible, I hated it.", " awful and I regretted it.", " dreadful, a waste of time."]
    neutral = [" a table with four legs.", ""]
    scores = vader.score(["My review: it was"] * 8, positive + negative + neutral)
    assert all(s > 0.5 for s in scores[:3]) and all(s < -0.4 for s in scores[3:6]), scores
    assert scores[6:] == [0.0, 0.0]
    # only the continuation is scored: a hostile prompt does not move it
    assert vader.score(["I hate this awful terrible place:"], positive[:1]) == scores[:1]


def test_a_missing_backend_names_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("vaderSentiment", "transformers") else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install vaderSentiment"):
        reward_module.check_reward_spec("vader")
    with pytest.raises(ConfigError, match="needs transformers: pip install transformers"):
        reward_module.check_reward_spec("hf:siebert/sentiment-roberta-large-english")


@pytest.mark.parametrize("spec", ["vaderr", "hf:", "hf", "sentiment:vader", "vader:x"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ConfigError, match="expected vader"):
        reward_module.check_reward_spec(spec)


# ----------------------------------------------------------------------------- a transformers classifier

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A random-init GPT-2 sequence classifier with GPT-2's tokenizer, saved as a hub model would be."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("classifier")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, num_labels=2,
                                     id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(path)
    write_tokenizer_files(str(path), 64)  # GPT-2's tokenizer, which has no pad token: the reward sets one
    return path


TEXTS = [" wonderful, I loved it.", " awful.", " a long and winding continuation with many more tokens in it"]


def direct_logits(classifier_dir, text):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification
    model = GPT2ForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        return model(**AutoTokenizer.from_pretrained(classifier_dir)(text, return_tensors="pt")).logits[0]


def test_classifier_scores_are_the_positive_class_probability_and_logit(classifier_dir):
    probability = reward_module.load_reward(f"hf:{classifier_dir}").score([""] * 3, TEXTS)  # one padded batch
    logit = reward_module.load_reward(f"hf_logit:{classifier_dir}").score([""] * 3, TEXTS)
    for text, p, l in zip(TEXTS, probability, logit):
        expected = direct_logits(classifier_dir, text)  # each text alone, unpadded
        assert l == pytest.approx(expected[1].item(), rel=1e-4, abs=1e-5)
        assert p == pytest.approx(torch.softmax(expected, -1)[1].item(), rel=1e-4, abs=1e-6)


def test_classifier_without_a_positive_label_is_refused():
    with pytest.raises(ConfigError, match="no positive class"):
        reward_module.positive_label_index({0: "anger", 1: "joy", 2: "fear"}, "some/model")
    assert reward_module.positive_label_index({0: "LABEL_0", 1: "LABEL_1"}, "x") == 1
    assert reward_module.positive_label_index({0: "POSITIVE", 1: "NEGATIVE"}, "x") == 0


def test_a_hub_classifier_that_cannot_be_fetched_is_refused_before_any_work(tmp_path, monkeypatch):
    from test_fsdp_train import TINY, run_in_process
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    result = run_in_process([*TINY, f"--out_dir={tmp_path / 'run'}", "--reward=hf:someone/no-such-classifier"])
    assert result.returncode == 2 and "could not fetch 'someone/no-such-classifier'" in result.stderr, result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and not (tmp_path / "run").exists()


def test_a_missing_classifier_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="reward classifier .*nothing_here"):
        reward_module.load_reward(f"hf:{tmp_path / 'nothing_here'}")


# ----------------------------------------------------------------------------- pair generation

def test_ranked_pairs_are_all_pairs_with_distinct_scores_higher_first():
    records, ties = ranked_pairs("p", ["a", "b", "c", "d"], [0.1, 0.9, 0.5, -0.3])
    assert ties == 0 and len(records) == 6  # k(k-1)/2 for the paper's k = 4
    expected = {("b", "a"), ("a", "d"), ("c", "a"), ("b", "c"), ("b", "d"), ("c", "d")}
    assert {(r["chosen"], r["rejected"]) for r in records} == expected
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in records)
    records, ties = ranked_pairs("p", ["a", "b", "c", "d"], [0.5, 0.5, 0.5, 0.1])
    assert ties == 3 and {(r["chosen"], r["rejected"]) for r in records} == {("a", "d"), ("b", "d"), ("c", "d")}


class LengthReward:
    """A reward known by hand: the number of characters of the continuation."""
    def score(self, prompts, continuations):
        return [float(len(text)) for text in continuations]


def test_generate_pairs_counts_ties_and_is_seeded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).eval()
    prompts = ["Honestly, the hotel was", "The movie"]
    first = generate_pairs(model, prompts, LengthReward(), k=4, max_new_tokens=6, seed=3, batch_size=3)
    assert first == generate_pairs(model, prompts, LengthReward(), k=4, max_new_tokens=6, seed=3, batch_size=3)
    other = generate_pairs(model, prompts, LengthReward(), k=4, max_new_tokens=6, seed=4)
    assert other[0] != first[0]
    records, counts, best = first
    assert counts["prompts"] == 2 and counts["samples"] == 8
    n_samples = 8 - counts["empty_samples_dropped"] - counts["repeated_samples_dropped"]
    assert counts["pairs"] + counts["ties_dropped"] <= 2 * 6 and n_samples >= 6
    assert counts["pairs"] == len(records)
    for record in records:
        assert len(record["chosen"]) > len(record["rejected"]) and record["prompt"] in prompts
    for b in best:  # the longest sample of its prompt
        assert len(b["chosen"]) == max(len(r["chosen"]) for r in records if r["prompt"] == b["prompt"])


def test_repeated_and_empty_samples_are_dropped_before_ranking(monkeypatch):
    import generate_pairs as module
    monkeypatch.setattr(module, "sample_completions", lambda *a, **k: [[" good", " good", "", " bad"]])
    records, counts, best = module.generate_pairs(None, ["p"], LengthReward(), k=4)
    assert [(r["chosen"], r["rejected"]) for r in records] == [(" good", " bad")]  # once, not twice
    assert counts["empty_samples_dropped"] == 1 and counts["repeated_samples_dropped"] == 1
    assert counts["ties_dropped"] == 0 and best == [{"prompt": "p", "chosen": " good", "rejected": " bad"}]


def test_prompt_files_name_the_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n{\"text\": 1}\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:4: expected an object"):
        read_prompts(str(path))
    path.write_text(json.dumps({"prompt": "a", "chosen": "x"}) + "\n" + json.dumps({"prompt": "b"}) + "\n"
                    + json.dumps({"prompt": "a"}) + "\n")
    assert read_prompts(str(path)) == ["a", "b"]  # a trainer's JSONL: each prompt once
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\nsecond\n")
    assert read_prompts(str(text)) == ["first prompt", "second"]


@pytest.mark.parametrize("damage, message", [
    ("custom_code", "names custom code (auto_map)"),
    ("pickle_only", "holds no .safetensors weights"),
])
def test_a_classifier_that_cannot_be_loaded_safely_is_refused_before_the_sft_stage(tmp_path, damage, message):
    """Custom code, or weights only as a pickle: one line, exit 2, before the SFT warm start (it was
    found after the whole stage, the custom code as a raw transformers ValueError). Nothing of it is
    run or unpickled either way."""
    from test_fsdp_train import TINY, run_in_process
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"],
              "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}}
    if damage == "custom_code":
        config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
        (classifier / "model.safetensors").write_bytes(b"")
    else:
        (classifier / "pytorch_model.bin").write_bytes(b"not read")
    (classifier / "config.json").write_text(json.dumps(config))
    result = run_in_process([*TINY, f"--out_dir={tmp_path / 'run'}", f"--reward=hf:{classifier}", "--sft_steps=3"])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "sft step" not in result.stdout and not (tmp_path / "run").exists()
