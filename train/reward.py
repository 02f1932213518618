"""Ground-truth rewards of generated text: the sentiment score that the DPO paper's controlled
sentiment experiment (Sec. 6.1, App. C.1) ranks samples with and plots on Figure 2's y axis.

    reward = load_reward("vader")                       # offline: VADER's lexicon, compound score in [-1, 1]
    reward = load_reward("hf:siebert/sentiment-roberta-large-english")   # P(positive), in [0, 1]
    reward = load_reward("hf_logit:lvwerra/distilbert-imdb")             # the positive-class logit
    reward = load_reward("rm:out/rm/final")             # a reward model trained here (objective: reward_model)
    scores = reward.score(prompts, continuations)       # one float per continuation

A ground truth scores the continuation only, not the prompt: the prompt is the same for the policy and
the reference, and a strongly worded prompt would otherwise dominate every sample's score. A reward
model (rm:) scores prompt + continuation, as it was trained on the pairs.

vader and hf are optional extras (`pip install -e ".[reward]"` for VADER; transformers for a
classifier), imported on first use with a message saying what to install. A classifier is loaded
from safetensors only (use_safetensors=True) and never runs code from its repository, so loading
one unpickles and executes nothing.
"""
import importlib.util
import json
import os

from errors import ConfigError
from gpt2 import WeightsError, hub_snapshot, looks_like_a_path, read_hf_config, resolve_checkpoint_dir, weight_files

SPEC_HELP = ("vader (offline sentiment lexicon; pip install vaderSentiment), hf:<hub id or directory> "
             "(a text-classification model's positive-class probability; needs transformers), "
             "hf_logit:<hub id or directory> (its positive-class logit), rm:<directory> (a reward model trained "
             "by fsdp_train.py with objective reward_model: its final/ folder; needs nothing more)")


def check_reward_spec(spec: str):
    """A spec's form and its backend's package, checked before any work (ConfigError otherwise)."""
    backend, _, model = spec.partition(":")
    if backend == "vader" and not model:
        package, extra = "vaderSentiment", 'pip install vaderSentiment (or pip install -e ".[reward]")'
    elif backend in ("hf", "hf_logit") and model:
        package, extra = "transformers", "pip install transformers"
    elif backend == "rm" and model:
        return
    else:
        raise ConfigError(f"reward={spec!r}: expected {SPEC_HELP}")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"reward={spec} needs {package}: {extra}")


CLASSIFIER_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer; no pickles


def fetch_reward(spec: str) -> str:
    """A classifier's local directory, downloaded into the hub cache if it is a hub id (offline mode
    and the cache respected, as for weights). The trainer calls it on every rank before the process
    group exists, so a bad id fails before any work and no rank waits in a collective on a download."""
    check_reward_spec(spec)
    backend, _, model = spec.partition(":")
    if backend == "vader":
        return model
    if backend == "rm":
        return check_reward_model_dir(model, spec)
    if os.path.isdir(model):
        return check_classifier_dir(model, spec)
    if looks_like_a_path(model):
        raise ConfigError(f"reward classifier {model!r}: no such directory (and not a hub id like 'org/name')")
    return check_classifier_dir(hub_snapshot(model, CLASSIFIER_PATTERNS, error=ConfigError, holding="the "
                                             "classifier's config.json, model.safetensors and tokenizer files"), spec)


def check_classifier_dir(path, spec) -> str:
    """A classifier directory that can be loaded as this project loads one, checked before any work:
    a config.json without custom code (auto_map: code from the repository, never run here), weights
    in safetensors (a pickle such as pytorch_model.bin is never loaded), a positive class."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise ConfigError(f"reward={spec}: {config_path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"reward={spec}: {config_path} is not a JSON object")
    if "auto_map" in config:
        raise ConfigError(f"reward={spec}: {config_path} names custom code (auto_map), which this project never "
                          "runs; use a classifier that transformers implements")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise ConfigError(f"reward={spec}: {path} holds no .safetensors weights (a pickle such as "
                          "pytorch_model.bin is never loaded)")
    positive_label_index(config.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}, spec)  # transformers' default
    return path


def check_reward_model_dir(path, spec) -> str:
    """rm:<dir>: a GPT-2 reward model folder (config.json naming GPT2ForSequenceClassification with one
    label, safetensors weights), checked before any work."""
    try:
        directory = resolve_checkpoint_dir(path)
        read_hf_config(directory)  # a GPT-2 config.json
        weight_files(directory)  # safetensors weights
        config_path = os.path.join(directory, "config.json")
        with open(config_path, "rb") as f:
            config = json.loads(f.read())
    except (WeightsError, OSError, ValueError) as err:
        raise ConfigError(f"reward={spec}: {err}") from None
    if config.get("architectures") != ["GPT2ForSequenceClassification"] or config.get("num_labels", 1) != 1:
        raise ConfigError(f"reward={spec}: {config_path} is not a one-label GPT2ForSequenceClassification (a reward "
                          "model trained with objective: reward_model; its final/ folder)")
    return path


def load_reward(spec: str, device="cpu"):
    check_reward_spec(spec)
    backend, _, model = spec.partition(":")
    if backend == "vader":
        return VaderReward()
    if backend == "rm":
        return RewardModel(check_reward_model_dir(model, spec), device)
    model = fetch_reward(spec)  # the cached snapshot's directory, or the directory given
    return ClassifierReward(model, device, as_logit=backend == "hf_logit")


class VaderReward:
    """VADER (Hutto & Gilbert 2014): a sentiment lexicon with rules for negation, intensifiers and
    punctuation, shipped inside the vaderSentiment wheel. Score: the compound polarity in [-1, 1]."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, continuations) -> list[float]:
        return [self.analyzer.polarity_scores(text)["compound"] for text in continuations]


class ClassifierReward:
    """A transformers sequence-classification model (the paper's siebert/sentiment-roberta-large-
    english; TRL's examples use lvwerra/distilbert-imdb), by hub id or local directory. Score: the
    probability of the positive class (or its logit with as_logit). The positive class is the label
    named like "positive"/"POS" in config.id2label, else index 1 of a two-label model."""

    def __init__(self, name_or_dir, device="cpu", as_logit=False, batch_size=32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.torch, self.device, self.as_logit, self.batch_size = torch, device, as_logit, batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_dir)  # transformers' default: no repository code
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_dir, use_safetensors=True)
        except OSError as err:  # not found, offline without a cache, no safetensors weights
            raise ConfigError(f"reward classifier {name_or_dir!r}: {str(err).splitlines()[0]}") from err
        if self.tokenizer.pad_token is None:  # GPT-2-style classifiers: pad with end-of-text, as TRL does
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.eos_token_id
        self.model.to(device).eval()
        self.positive = positive_label_index(self.model.config.id2label, name_or_dir)

    def score(self, prompts, continuations) -> list[float]:
        scores = []
        for start in range(0, len(continuations), self.batch_size):
            texts = list(continuations[start:start + self.batch_size])
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            with self.torch.no_grad():
                logits = self.model(**inputs).logits.float()
            column = logits[:, self.positive] if self.as_logit else logits.softmax(-1)[:, self.positive]
            scores += column.tolist()
        return scores


class RewardModel:
    """A reward model trained here (objective: reward_model), run by gpt2.py: no transformers. Score: its
    scalar head on prompt + continuation (each tokenized as the pairs were), read where training read
    it (gpt2.last_token_index); a row longer than the model's positions keeps its last tokens."""

    def __init__(self, path, device="cpu", batch_size=32):
        import torch
        from gpt2 import GPT
        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.model = GPT.from_pretrained(path, device=device, score_head=True)

    def score(self, prompts, continuations) -> list[float]:
        from data.batches import right_pad
        from data.tokenizer import encode
        from dpo import sequence_scores
        limit = self.model.config.n_positions
        rows = [(encode(p) + encode(c))[-limit:] for p, c in zip(prompts, continuations)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            input_ids = right_pad(rows[start:start + self.batch_size]).to(self.device)
            with self.torch.no_grad():
                scores += sequence_scores(self.model, input_ids).tolist()
        return scores


def positive_label_index(id2label: dict, where: str) -> int:
    by_name = [int(i) for i, label in id2label.items() if str(label).lower() in ("positive", "pos", "label_pos")]
    if len(by_name) == 1:
        return by_name[0]
    if len(id2label) == 2:
        return 1  # LABEL_0/LABEL_1 (SST-2 and IMDb convention: 1 = positive)
    raise ConfigError(f"reward classifier {where!r}: no positive class among its labels {dict(id2label)}")
