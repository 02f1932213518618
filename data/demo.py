"""A small preference set generated deterministically on demand, with no download: short English
prompts about everyday things ("Honestly, the hotel was") each have two positive continuations
preferred over two negative ones, built from small word lists.
Because the positive and negative words recur across all prompts, a tiny randomly initialised GPT-2
trained with DPO for under a minute on CPU learns to prefer the positive words on prompts it has
never seen.

This file makes text only; data/formats.py tokenises it (`make_demo_groups`), as it does any file.
"""
import json
import random

# each template ends where an adjective fits, so every continuation below reads as English
PROMPT_TEMPLATES = [
    "My review of the {}: it was",
    "Honestly, the {} was",
    "I have to say the {} is",
    "In short, the {} was",
    "Our friends told us the {} was",
    "After one visit, the {} felt",
    "Everyone agreed that the {} was",
    "To be fair, the {} is",
]
SUBJECTS = [
    "new phone", "hotel", "movie", "restaurant", "concert", "book", "laptop", "coffee shop",
    "museum", "train ride", "pizza", "video game", "hike", "TV show", "class", "car",
    "bakery", "album", "play", "beach",
]
POSITIVE_WORDS = ["wonderful", "great", "excellent", "amazing", "fantastic", "lovely", "delightful", "superb"]
NEGATIVE_WORDS = ["terrible", "awful", "horrible", "dreadful", "disappointing", "boring", "poor", "miserable"]
POSITIVE_ENDINGS = [", I loved it.", " and I enjoyed it.", ", I would go back.", ", truly a joy."]
NEGATIVE_ENDINGS = [", I hated it.", " and I regretted it.", ", I would never return.", ", a waste of time."]
MAX_GROUPS = len(PROMPT_TEMPLATES) * len(SUBJECTS)  # one group per distinct prompt


def demo_texts(n_groups=128, seed=0):
    """(prompt, [2 positive continuations], [2 negative continuations]) for n_groups distinct prompts."""
    if not 1 <= n_groups <= MAX_GROUPS:
        raise ValueError(f"demo_texts: n_groups={n_groups}, expected 1..{MAX_GROUPS} (one group per distinct prompt)")
    rng = random.Random(seed)  # our own generator: the global random state is left alone
    prompts = [template.format(subject) for template in PROMPT_TEMPLATES for subject in SUBJECTS]
    rng.shuffle(prompts)
    texts = []
    for prompt in prompts[:n_groups]:
        # distinct words and endings within a group, so no pair (or two chosen) repeats a response
        positives = [f" {w}{e}" for w, e in zip(rng.sample(POSITIVE_WORDS, 2), rng.sample(POSITIVE_ENDINGS, 2))]
        negatives = [f" {w}{e}" for w, e in zip(rng.sample(NEGATIVE_WORDS, 2), rng.sample(NEGATIVE_ENDINGS, 2))]
        texts.append((prompt, positives, negatives))
    return texts


def write_demo_jsonl(path, n_groups=128, seed=0):
    """Write the demo set as prompt/chosen/rejected JSON lines (one line per pair); returns the line count."""
    n_lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for prompt, positives, negatives in demo_texts(n_groups, seed):
            for chosen in positives:
                for rejected in negatives:
                    f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
                    n_lines += 1
    return n_lines
