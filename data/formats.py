"""Preference files in, lists of PreferenceGroup out.

Three formats are read, each checked record by record before any training starts:
- OpenAI lm-human-preferences `offline_5k.json` (best of 4 samples per query),
- JSON lines with text fields `prompt`, `chosen`, `rejected` (this project's interchange format),
- Anthropic HH-RLHF `.jsonl(.gz)` (two whole dialogues per line).
A group keeps all k responses to one prompt and the (chosen, rejected) pairs among them, so a
prompt never lands in both the train and eval splits (see data/batches.py).
"""
import gzip
import json
import os
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass

from data.demo import demo_texts
from data.tokenizer import VOCAB_SIZE, encode
from errors import ConfigError, DataError


@dataclass
class PreferenceGroup:
    prompt: list[int]  # prompt token ids, no pads
    responses: list[list[int]]  # k >= 2 responses' token ids, no pads
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into responses
    source: str  # "path:line N" or "path[index]": where error messages and warnings point


KINDS = ("lm_human_preferences", "jsonl", "hh", "demo")

# -----------------------------------------------------------------------------
# checks shared by the loaders; `where` names the file and record for the message


def _check_exists(path):
    if not os.path.isfile(path):
        raise DataError(f"preference file not found: {path!r} "
                                f"(check the path; relative paths start at {os.getcwd()!r})")


def _require_str(record, key, where):
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(record)})")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _require_ids(record, key, where):
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(record)})")
    ids = record[key]
    # bool is a subclass of int in Python; a list of true/false is not a list of token ids
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{where}: field {key!r} must be a list of integer token ids, got {str(ids)[:80]}")
    return ids


def _read_lines(path):
    """(line number, text) of the non-blank lines of a .jsonl or .jsonl.gz file."""
    _check_exists(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = list(enumerate(f, start=1))
    except (OSError, UnicodeDecodeError) as err:  # bad gzip stream, binary file, ...
        raise DataError(f"{path}: cannot be read as UTF-8 JSON lines ({type(err).__name__}: {err})") from err
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return lines


def _parse_json_line(path, line_number, line):
    where = f"{path}:line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record, where


# -----------------------------------------------------------------------------
# OpenAI lm-human-preferences

LMHP_PAD_ID = 50259  # lm-human-preferences pads queries and samples with this id, outside GPT-2's vocab
LMHP_TASKS = ("sentiment", "descriptiveness")
LMHP_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/{task}/offline_5k.json"


def _download_lmhp(task, cache_dir):
    cache_dir = os.path.expanduser(cache_dir or "~/.cache/gpt2-dpo")
    path = os.path.join(cache_dir, "lm-human-preferences", task, "offline_5k.json")
    if os.path.isfile(path):
        return path
    url = LMHP_URL.format(task=task)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # write to a temp file beside the target and rename, so an interrupted download leaves no half file
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            f.write(response.read())
        os.replace(tmp_path, path)
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "no file", same fix
        raise DataError(
            f"could not download the lm-human-preferences {task!r} labels from {url} "
            f"({type(err).__name__}: {err}). Offline? Download the file by hand and pass its path "
            f"instead of the task name (or place it at {path})."
        ) from err
    finally:  # also on Ctrl-C
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def _strip_lmhp_pads(ids, where, key):
    bad = [i for i in ids if not (0 <= i < VOCAB_SIZE) and i != LMHP_PAD_ID]
    if bad:
        raise DataError(f"{where}: field {key!r} holds token id {bad[0]}, outside GPT-2's "
                         f"0..{VOCAB_SIZE - 1} (and not the pad {LMHP_PAD_ID})")
    return [i for i in ids if i != LMHP_PAD_ID]


def load_lm_human_preferences(path_or_task, cache_dir=None, max_records=None, counts=None):
    """One group per record: the query, its 4 samples, and (best, j) for the 3 other samples j.

    `path_or_task` is a local offline_5k.json or a task name ("sentiment", "descriptiveness"),
    downloaded into `cache_dir` (default ~/.cache/gpt2-dpo) on first use. Pads (50259) are removed,
    so they never reach the embedding. `max_records` keeps the first N (OpenAI trained on 4992).
    """
    if path_or_task in LMHP_TASKS and not os.path.exists(path_or_task):
        path = _download_lmhp(path_or_task, cache_dir)
    else:
        path = path_or_task
    _check_exists(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON ({err}); expected one JSON array of records") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected one JSON array of records, got a JSON {type(records).__name__}")
    if max_records is not None:
        if max_records < 1:
            raise ConfigError(f"max_records={max_records}: expected a positive number of records to keep, or None for all")
        records = records[:max_records]
    if not records:
        raise DataError(f"{path}: no records (the JSON array is empty)")

    groups = []
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = _strip_lmhp_pads(_require_ids(record, "query", where), where, "query")
        if not prompt:
            raise DataError(f"{where}: 'query' holds only pads; a response needs a prompt to be scored against")
        responses = []
        for j in range(4):
            key = f"sample{j}"
            responses.append(_strip_lmhp_pads(_require_ids(record, key, where), where, key))
        if "best" not in record:
            raise DataError(f"{where}: missing field 'best' (fields present: {sorted(record)})")
        best = record["best"]
        if not isinstance(best, int) or isinstance(best, bool):
            raise DataError(f"{where}: field 'best' must be an integer 0..3, got {type(best).__name__}")
        if not 0 <= best <= 3:
            raise DataError(f"{where}: field 'best' is {best}, expected 0..3 (the index of the preferred sample)")
        pairs = [(best, j) for j in range(4) if j != best]
        groups.append(PreferenceGroup(prompt, responses, pairs, where))
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(records)
    return groups


# -----------------------------------------------------------------------------
# JSON lines: {"prompt": str, "chosen": str, "rejected": str}


def load_jsonl(path, counts=None):
    """One group per line: responses [chosen, rejected], pairs [(0, 1)]. Blank lines are skipped."""
    groups = []
    lines = _read_lines(path)
    for line_number, line in lines:
        record, where = _parse_json_line(path, line_number, line)
        prompt, chosen, rejected = (_require_str(record, key, where) for key in ("prompt", "chosen", "rejected"))
        prompt_ids = encode(prompt)
        if not prompt_ids:
            raise DataError(f"{where}: 'prompt' is empty; a response needs a prompt to be scored against")
        groups.append(PreferenceGroup(prompt_ids, [encode(chosen), encode(rejected)], [(0, 1)], where))
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(lines)
    return groups


# -----------------------------------------------------------------------------
# Anthropic HH-RLHF: {"chosen": dialogue, "rejected": dialogue}

HH_TURN = "\n\nAssistant:"


def load_hh(path, counts=None):
    """One group per line, split at the last "\\n\\nAssistant:" of each dialogue.

    The prompt is the dialogue up to and including that marker; the responses are the rest of the
    chosen and of the rejected dialogue. The two dialogues should share that prompt, but a few do
    not (5 of 2,312 in harmless-base/test: the dialogues diverge in an earlier turn, so there is no
    common context to compare the answers under). Those records are dropped, counted as
    `dropped_prompt_mismatch`, and a warning names the first one.
    """
    groups, mismatched = [], []
    lines = _read_lines(path)
    for line_number, line in lines:
        record, where = _parse_json_line(path, line_number, line)
        chosen, rejected = _require_str(record, "chosen", where), _require_str(record, "rejected", where)
        splits = []
        for key, dialogue in (("chosen", chosen), ("rejected", rejected)):
            cut = dialogue.rfind(HH_TURN)
            if cut < 0:
                raise DataError(f"{where}: {key!r} has no {HH_TURN!r} turn; expected an HH-RLHF dialogue")
            cut += len(HH_TURN)
            splits.append((dialogue[:cut], dialogue[cut:]))
        (chosen_prompt, chosen_response), (rejected_prompt, rejected_response) = splits
        if chosen_prompt != rejected_prompt:
            mismatched.append(where)
            continue
        responses = [encode(chosen_response), encode(rejected_response)]
        groups.append(PreferenceGroup(encode(chosen_prompt), responses, [(0, 1)], where))
    if mismatched:
        warnings.warn(f"{path}: dropped {len(mismatched)} record(s) whose chosen and rejected dialogues differ "
                      f"before the last Assistant turn (first: {mismatched[0]})", stacklevel=2)
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(lines)
        counts["dropped_prompt_mismatch"] = counts.get("dropped_prompt_mismatch", 0) + len(mismatched)
    return groups


# -----------------------------------------------------------------------------


def make_demo_groups(n_groups=128, seed=0):
    """The demo set (data/demo.py): n_groups groups of 4 responses (2 positive, 2 negative) with 4
    pairs, each positive over each negative."""
    groups = []
    for index, (prompt, positives, negatives) in enumerate(demo_texts(n_groups, seed)):
        responses = [encode(text) for text in positives + negatives]  # indices 0, 1 positive; 2, 3 negative
        pairs = [(0, 2), (0, 3), (1, 2), (1, 3)]
        groups.append(PreferenceGroup(encode(prompt), responses, pairs, f"demo[{index}]"))
    return groups


def load_preferences(kind, path, **kwargs):
    """Load `path` as `kind` (one of KINDS) and drop the pairs DPO cannot learn from.

    A pair whose chosen and rejected token ids are identical gives zero gradient and a meaningless
    accuracy, and a pair with an empty response has nothing to score: both are dropped, counted and
    warned about; groups left with no pairs are removed. Returns (groups, counts) with counts
    `records`, `groups`, `pairs`, `dropped_identical`, `dropped_empty`, `dropped_prompt_mismatch`.
    kwargs go to the loader (e.g. cache_dir/max_records, or n_groups/seed for "demo").
    """
    counts = {"records": 0, "dropped_prompt_mismatch": 0}
    if kind == "lm_human_preferences":
        groups = load_lm_human_preferences(path, counts=counts, **kwargs)
    elif kind == "jsonl":
        groups = load_jsonl(path, counts=counts, **kwargs)
    elif kind == "hh":
        groups = load_hh(path, counts=counts, **kwargs)
    elif kind == "demo":
        groups = make_demo_groups(**kwargs)  # generated, so `path` is not used
        counts["records"] = len(groups)
    else:
        raise ConfigError(f"unknown preference data kind {kind!r}; valid kinds: {', '.join(KINDS)}")

    identical, empty, kept_groups = [], [], []
    for group in groups:
        kept_pairs = []
        for chosen, rejected in group.pairs:
            if not group.responses[chosen] or not group.responses[rejected]:
                empty.append(group.source)
            elif group.responses[chosen] == group.responses[rejected]:
                identical.append(group.source)
            else:
                kept_pairs.append((chosen, rejected))
        if kept_pairs:
            group.pairs = kept_pairs
            kept_groups.append(group)
    if identical:
        warnings.warn(f"dropped {len(identical)} pair(s) whose chosen and rejected token ids are identical "
                      f"(first: {identical[0]})", stacklevel=2)
    if empty:
        warnings.warn(f"dropped {len(empty)} pair(s) with an empty response (first: {empty[0]})", stacklevel=2)
    counts.update(groups=len(kept_groups), pairs=sum(len(g.pairs) for g in kept_groups),
                  dropped_identical=len(identical), dropped_empty=len(empty))
    return kept_groups, counts
