"""IMDb for the DPO paper's sentiment experiment (Sec. 6.1, App. C.1): its prompts and its SFT text.

    python -m data.imdb prompts --split train --out prompts.jsonl                      # 25,000 reviews
    python -m data.imdb prompts --split test --out test_prompts.jsonl --max_prompts 1000
    python -m data.imdb texts --split train --out imdb_train_texts.jsonl

- prompts: by the recipe of TRL's 2023 sentiment example that the paper followed, the reviews longer
  than 200 characters, each cut to its first 2 to 8 GPT-2 tokens (a length drawn per review,
  seeded). Written as a prompt file, one {"prompt": ...} per line, for generate_pairs.py,
  frontier.py's `prompts` and the trainer's `eval_prompts` (the paper evaluates on the test split's).
- texts: every review of the split as it is, one {"text": ...} per line, for SFT (`dataset: text`,
  data/texts.py): the paper fine-tuned gpt2-large on IMDb's train reviews for its SFT model.

It reads stanfordnlp/imdb's Parquet files (needs pyarrow) through the hub cache, so on a machine with
internet the first run downloads them and later ones (HF_HUB_OFFLINE=1) read the cache; or pass
--dataset DIR, a local copy laid out as the hub's (plain_text/train-*.parquet, with "text" columns).
"""
import argparse
import json
import os
import sys

import numpy as np

from data.formats import resolve_hub_dataset, split_files
from data.records import parquet_records
from data.tokenizer import decode, encode
from errors import DataError, exit_code_of

IMDB = "stanfordnlp/imdb/plain_text"


def review_texts(dataset, split) -> list[str]:
    """The "text" of every review of the split, in file order."""
    directory, subdir = resolve_hub_dataset(dataset, split)
    texts = []
    for path in split_files(directory, subdir, split):
        for row, where in parquet_records(path):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{where}: no \"text\" string (an IMDb review row has text and label)")
            texts.append(row["text"])
    return texts


def prefixes(texts, min_chars=200, min_tokens=2, max_tokens=8, seed=0) -> list[str]:
    """Of each text longer than min_chars (TRL's filter), its first n tokens decoded, n drawn uniformly
    from min_tokens..max_tokens per text; distinct prefixes, in order."""
    rng = np.random.default_rng(seed)
    found = []
    for text in texts:
        if len(text) <= min_chars:
            continue
        n = int(rng.integers(min_tokens, max_tokens + 1))
        found.append(decode(encode(text)[:n]))
    return list(dict.fromkeys(found))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("prompts", "texts"), help="prompts: 2-8-token prefixes of the reviews (a prompt "
                   "file); texts: the reviews themselves (SFT's plain text)")
    p.add_argument("--split", default="train", help="train or test (the paper: train for SFT and pairs, test for "
                   "evaluation), or unsupervised (50,000 unlabelled reviews)")
    p.add_argument("--out", required=True, help="the file to write: JSONL, one {\"prompt\": ...} or {\"text\": ...} "
                   "per line")
    p.add_argument("--dataset", default=IMDB, help="a hub dataset (org/name/subdir) or a local copy's directory")
    p.add_argument("--max_prompts", type=int, default=0, help="prompts: keep the first N prompts (0 = all)")
    p.add_argument("--min_tokens", type=int, default=2, help="prompts: the shortest prefix, in GPT-2 tokens")
    p.add_argument("--max_tokens", type=int, default=8, help="prompts: the longest prefix, in GPT-2 tokens")
    p.add_argument("--min_chars", type=int, default=200, help="prompts: only reviews longer than this (TRL's recipe)")
    p.add_argument("--seed", type=int, default=0, help="prompts: seed of the prefix lengths")
    args = p.parse_args(argv)
    if not 1 <= args.min_tokens <= args.max_tokens:
        raise DataError(f"--min_tokens {args.min_tokens} and --max_tokens {args.max_tokens}: need 1 <= min <= max")
    texts = review_texts(args.dataset, args.split)
    if args.what == "texts":
        records = [{"text": text} for text in texts]
    else:
        prompts = prefixes(texts, args.min_chars, args.min_tokens, args.max_tokens, args.seed)
        records = [{"prompt": prompt} for prompt in (prompts[:args.max_prompts] if args.max_prompts else prompts)]
    if not records:
        raise DataError(f"{args.dataset} ({args.split}): no review"
                        + (f" longer than {args.min_chars} characters" if args.what == "prompts" else ""))
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:  # renamed into place: never half a file
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}: {len(records)} "
          + (f"prompts of {args.min_tokens}-{args.max_tokens} tokens" if args.what == "prompts" else "reviews")
          + f" from {args.dataset} ({args.split})")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
