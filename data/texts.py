"""Plain text for SFT (`dataset: text`): the paper's first stage fine-tunes GPT-2 on unlabelled
text of the task's domain (gpt2-large on IMDb's train reviews, for the sentiment experiment).

The file holds records with a "text" string: JSON lines (.jsonl, .jsonl.gz), a JSON array (.json)
or Parquet (IMDb's own files; needs pyarrow), such as `python -m data.imdb texts` writes. Each text
is one example: <|endoftext|> as its prompt (the token between documents in GPT-2's training text,
so the first token of a text is predicted as it would begin a document), and the text's tokens,
ended with <|endoftext|>, as its response, cut to its first max_len - 1 tokens.

Each text is a PreferenceGroup of its own, holding its one response and the pair (0, 0), so that
the trainer's split, order and batches treat texts as it treats prompts, and SFT reads each pair's
"chosen" as always. They are not merged by prompt (group_by_prompt): every text has the same
one-token prompt. Exact duplicate texts and empty ones are dropped and counted.
"""
from data.formats import PreferenceGroup
from data.records import json_records, parquet_records
from data.tokenizer import EOT_ID, encode
from errors import DataError

TEXT_PROMPT = [EOT_ID]


def load_texts(path, max_len, append_eos=None, max_records=None):
    """The texts of `path` as one-response groups (see the module's docstring) -> (groups, counts):
    records, texts, dropped_empty, dropped_duplicate, cut (texts longer than max_len - 1 tokens).
    append_eos: None (auto) or True ends each text with <|endoftext|>; False leaves it open."""
    named = parquet_records(path) if path.endswith(".parquet") else json_records(path)
    named = named[:max_records] if max_records else named
    groups, seen, room = [], set(), max_len - len(TEXT_PROMPT)  # room: the response's tokens
    counts = {"records": len(named), "texts": 0, "dropped_empty": 0, "dropped_duplicate": 0, "cut": 0}
    for record, where in named:
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a \"text\" string (dataset text reads plain text for SFT), got "
                            + (f"{type(text).__name__}" if "text" in record else f"the fields {sorted(record)}"))
        tokens = encode(text) + ([EOT_ID] if append_eos in (None, True) else [])
        if not text.strip():
            counts["dropped_empty"] += 1
        elif tuple(tokens) in seen:
            counts["dropped_duplicate"] += 1
        else:
            seen.add(tuple(tokens))
            counts["cut"] += len(tokens) > room
            groups.append(PreferenceGroup(list(TEXT_PROMPT), [tokens[:room]], [(0, 0)], where))
    counts["texts"] = len(groups)
    if not groups:
        raise DataError(f"{path}: no non-empty text")
    return groups, counts
