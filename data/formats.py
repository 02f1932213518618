"""Preference files in, lists of PreferenceGroup out.

The formats read, each checked record by record before any training starts:
- OpenAI lm-human-preferences `offline_5k.json` (best of 4 samples per query): `lm_human_preferences`;
- JSON lines in TRL's preference formats (`jsonl`): explicit prompt (`prompt`, `chosen`, `rejected`
  strings), implicit prompt (only `chosen` and `rejected`; the prompt is their longest common
  prefix), and conversational (lists of `{"role", "content"}` messages, rendered in HH's plain
  form, since GPT-2 has no chat template);
- Anthropic HH-RLHF `.jsonl(.gz)` (two whole dialogues per line, split at the last Assistant turn): `hh`;
- a Hugging Face dataset repo (`hub`): its JSON lines / JSON (/ Parquet, with pyarrow) files of one
  split, read as `jsonl` or `hh`.

Records are grouped by prompt (identical prompt token ids, in every format): a group holds every
distinct response to one prompt and the (chosen, rejected) pairs among them, so a prompt and all
its pairs go to one side of the train/eval split (data/batches.py), and group packing runs the
prompt once for all of them. Exact duplicate pairs are dropped and counted.
"""
import json
import os
import re
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass

from data.demo import demo_texts
from data.records import check_exists, json_records, parquet_records
from data.tokenizer import EOT_ID, VOCAB_SIZE, encode
from errors import ConfigError, DataError
from gpt2 import hub_snapshot


@dataclass
class PreferenceGroup:
    prompt: list[int]  # prompt token ids, no pads
    responses: list[list[int]]  # k >= 2 responses' token ids, no pads
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into responses
    source: str  # "path:line N" or "path[index]": where error messages and warnings point


KINDS = ("lm_human_preferences", "jsonl", "hh", "demo", "hub")
# The DPO authors' code and TRL end every response with <|endoftext|> and score it, so the policy
# learns where a response ends. lm-human-preferences samples are fixed 24-token continuations cut
# at a period: they did not end, so they get none.
APPEND_EOS_BY_DEFAULT = {"lm_human_preferences": False, "jsonl": True, "hh": True, "demo": True, "hub": True}
HUB_FORMATS = ("jsonl", "hh")

# -----------------------------------------------------------------------------
# checks shared by the loaders; `where` names the file and record for the message


def _warn_at(source, message):
    """A warning that points at the user's record ("path:line N" or "path[index]"), not at this file."""
    match = re.fullmatch(r"(.*):line (\d+)", source) or re.fullmatch(r"(.*)\[(\d+)\]", source)
    filename, line = (match.group(1), int(match.group(2))) if match else (source, 0)
    warnings.warn_explicit(message, UserWarning, filename=filename, lineno=line)


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
    check_exists(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"{path}: malformed JSON ({type(err).__name__}: {err}); expected one JSON array of "
                        "records") from err
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
# TRL's preference formats, as JSON lines: explicit or implicit prompt, standard or conversational

HUMAN_TURN, ASSISTANT_TURN, SYSTEM_TURN = "\n\nHuman:", "\n\nAssistant:", "\n\nSystem:"
TURN_OF_ROLE = {"user": HUMAN_TURN, "assistant": ASSISTANT_TURN, "system": SYSTEM_TURN}


def _check_messages(messages, key, where):
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                               and m.get("role") in TURN_OF_ROLE for m in messages):
        raise DataError(f"{where}: field {key!r} must be a list of {{'role', 'content'}} messages with role "
                        f"one of {', '.join(TURN_OF_ROLE)} and string content, got {str(messages)[:80]}")
    return messages


def render_messages(messages) -> str:
    """Messages in HH-RLHF's plain form, the form GPT-2 models tuned on HH saw:
    "\\n\\nHuman: hi\\n\\nAssistant: hello" (a system message becomes a "\\n\\nSystem: ..." turn)."""
    return "".join(f"{TURN_OF_ROLE[m['role']]} {m['content']}" for m in messages)


def _assistant_reply(messages, key, where):
    """The response text of a one-assistant-message completion: " content", as it follows "Assistant:"."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} must hold exactly one assistant message (the response), got "
                        f"roles {[m['role'] for m in messages]}")
    return " " + messages[0]["content"]


def split_common_prefix(chosen: str, rejected: str):
    """TRL's implicit prompt: (prompt, chosen response, rejected response), the prompt being the
    longest common prefix of the two texts. A space just before the split goes with the responses,
    as GPT-2's BPE attaches a space to the word after it."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def trl_record_texts(record, where):
    """One record of any of TRL's preference formats -> (prompt, chosen, rejected) texts."""
    chosen, rejected = (record.get(key) for key in ("chosen", "rejected"))
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: field {key!r} must be a string or a list of messages, got "
                            f"{type(value).__name__} (fields present: {sorted(record)})")
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    conversational = isinstance(chosen, list)
    if conversational:
        chosen, rejected = _check_messages(chosen, "chosen", where), _check_messages(rejected, "rejected", where)
    if "prompt" in record:  # explicit prompt
        prompt = record["prompt"]
        if conversational:
            prompt = render_messages(_check_messages(prompt, "prompt", where)) + ASSISTANT_TURN
            return prompt, _assistant_reply(chosen, "chosen", where), _assistant_reply(rejected, "rejected", where)
        return _require_str(record, "prompt", where), chosen, rejected
    if not conversational:  # implicit prompt: the common prefix of the two texts
        prompt, chosen, rejected = split_common_prefix(chosen, rejected)
        if not prompt:
            raise DataError(f"{where}: no 'prompt' field, and 'chosen' and 'rejected' share no prefix to take "
                            "as the prompt; add a 'prompt' field")
        return prompt, chosen, rejected
    n = 0  # implicit conversational: the common leading messages are the prompt
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: no 'prompt' field, and 'chosen' and 'rejected' share no leading message to "
                        "take as the prompt; add a 'prompt' field")
    return (render_messages(chosen[:n]) + ASSISTANT_TURN, _assistant_reply(chosen[n:], "chosen", where),
            _assistant_reply(rejected[n:], "rejected", where))


def _groups_from_trl_records(named_records):
    """One group per record: responses [chosen, rejected], pairs [(0, 1)]."""
    groups = []
    for record, where in named_records:
        prompt, chosen, rejected = trl_record_texts(record, where)
        prompt_ids = encode(prompt)
        if not prompt_ids:
            raise DataError(f"{where}: the prompt is empty; a response needs a prompt to be scored against")
        groups.append(PreferenceGroup(prompt_ids, [encode(chosen), encode(rejected)], [(0, 1)], where))
    return groups


def load_jsonl(path, counts=None):
    """JSON lines in any of TRL's preference formats (see trl_record_texts). Blank lines are skipped."""
    named_records = json_records(path)
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(named_records)
    return _groups_from_trl_records(named_records)


# -----------------------------------------------------------------------------
# Anthropic HH-RLHF: {"chosen": dialogue, "rejected": dialogue}


def _groups_from_hh_records(named_records, counts=None):
    """One group per record, split at the last "\\n\\nAssistant:" of each dialogue.

    The prompt is the dialogue up to and including that marker; the responses are the rest of the
    chosen and of the rejected dialogue. The two dialogues should share that prompt, but a few do
    not (5 of 2,312 in harmless-base/test: the dialogues diverge in an earlier turn, so there is no
    common context to compare the answers under). Those records are dropped, counted as
    `dropped_prompt_mismatch`, and a warning names the first one.
    """
    groups, mismatched = [], []
    for record, where in named_records:
        chosen, rejected = _require_str(record, "chosen", where), _require_str(record, "rejected", where)
        splits = []
        for key, dialogue in (("chosen", chosen), ("rejected", rejected)):
            cut = dialogue.rfind(ASSISTANT_TURN)
            if cut < 0:
                raise DataError(f"{where}: {key!r} has no {ASSISTANT_TURN!r} turn; expected an HH-RLHF dialogue")
            cut += len(ASSISTANT_TURN)
            splits.append((dialogue[:cut], dialogue[cut:]))
        (chosen_prompt, chosen_response), (rejected_prompt, rejected_response) = splits
        if chosen_prompt != rejected_prompt:
            mismatched.append(where)
            continue
        responses = [encode(chosen_response), encode(rejected_response)]
        groups.append(PreferenceGroup(encode(chosen_prompt), responses, [(0, 1)], where))
    if mismatched:
        _warn_at(mismatched[0], f"dropped {len(mismatched)} record(s) whose chosen and rejected dialogues differ "
                 f"before the last Assistant turn (first: {mismatched[0]})")
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(named_records)
        counts["dropped_prompt_mismatch"] = counts.get("dropped_prompt_mismatch", 0) + len(mismatched)
    return groups


def load_hh(path, counts=None):
    return _groups_from_hh_records(json_records(path), counts)


# -----------------------------------------------------------------------------
# a Hugging Face dataset repo: data_path "org/name" (or "org/name/subdir", or a local directory)

HUB_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def resolve_hub_dataset(name_or_dir, split, revision=None, cache_dir=None) -> tuple[str, str]:
    """(local snapshot directory, sub-directory to read) of a dataset repo. huggingface_hub does the
    caching and honours HF_HUB_OFFLINE / HF_HUB_CACHE, as for weights; only the split's files are
    fetched."""
    if os.path.isdir(name_or_dir):
        return name_or_dir, ""
    parts = name_or_dir.split("/")
    if name_or_dir.startswith(("/", ".", "~")) or len(parts) < 2 or not all(parts):
        raise ConfigError(f"data_path {name_or_dir!r}: no such directory, and not a hub dataset id like 'org/name' "
                          "(or 'org/name/subdir')")
    repo_id, subdir = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{subdir + '/' if subdir else ''}*{split}*{suffix}" for suffix in HUB_DATA_SUFFIXES]
    return hub_snapshot(repo_id, patterns, revision=revision or None, cache_dir=cache_dir, repo_type="dataset",
                        error=DataError, holding="the split's files", what="the dataset "), subdir


def split_files(directory, subdir, split):
    """The data files of one split, as the hub lays them out: a file named after the split
    (train.jsonl, train-00000-of-00001.parquet) or any file in a directory named after it."""
    found = []
    for root, _, names in os.walk(os.path.join(directory, subdir)):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            stem = name.split(".")[0]
            in_split = (stem == split or stem.startswith((f"{split}-", f"{split}_"))
                        or split in relative.split(os.sep)[:-1])
            if name.endswith(HUB_DATA_SUFFIXES) and in_split:
                found.append(path)
    if not found:
        raise DataError(f"{os.path.join(directory, subdir)}: no {'/'.join(HUB_DATA_SUFFIXES)} files for split "
                        f"{split!r} (a file named {split}.jsonl, {split}-*.parquet, ... or a directory named {split})")
    return sorted(found)


def load_hub(name_or_dir, split="train", revision=None, hub_format="jsonl", cache_dir=None, counts=None):
    """The split's files of a hub dataset repo, read as `jsonl` (TRL's formats) or `hh`."""
    if hub_format not in HUB_FORMATS:
        raise ConfigError(f"hub_format={hub_format!r} is not one of {', '.join(HUB_FORMATS)}")
    directory, subdir = resolve_hub_dataset(name_or_dir, split, revision, cache_dir)
    named_records = []
    for path in split_files(directory, subdir, split):
        named_records += parquet_records(path) if path.endswith(".parquet") else json_records(path)
    if hub_format == "hh":
        return _groups_from_hh_records(named_records, counts)
    if counts is not None:
        counts["records"] = counts.get("records", 0) + len(named_records)
    return _groups_from_trl_records(named_records)


# -----------------------------------------------------------------------------
# the demo set, generated


def make_demo_groups(n_groups=128, seed=0):
    """The demo set (data/demo.py): n_groups groups of 4 responses (2 positive, 2 negative) with 4
    pairs, each positive over each negative."""
    groups = []
    for index, (prompt, positives, negatives) in enumerate(demo_texts(n_groups, seed)):
        responses = [encode(text) for text in positives + negatives]  # indices 0, 1 positive; 2, 3 negative
        pairs = [(0, 2), (0, 3), (1, 2), (1, 3)]
        groups.append(PreferenceGroup(encode(prompt), responses, pairs, f"demo[{index}]"))
    return groups


# -----------------------------------------------------------------------------
# from records to groups: clean, end each response, group by prompt


def group_by_prompt(groups: list[PreferenceGroup]):
    """Merge groups with identical prompt token ids into one, in order of first appearance.
    Returns (groups, duplicate_sources, identical_pairs): where each duplicate came from, and a count.

    The merged group holds each distinct response once (identical token ids are one response), so
    its pairs share their responses' slots when packed. A pair that repeats one already there is a
    duplicate and is dropped; so is a pair whose two responses are identical (possible after
    truncation). Pairs keep their order; the source is the first record's.
    """
    merged = {}  # prompt ids -> (group, {response ids: index}, {pair})
    duplicates, identical = [], 0
    for group in groups:
        target, index_of, seen = merged.setdefault(
            tuple(group.prompt), (PreferenceGroup(list(group.prompt), [], [], group.source), {}, set()))
        for chosen, rejected in group.pairs:
            indices = []
            for response in (group.responses[chosen], group.responses[rejected]):
                key = tuple(response)
                if key not in index_of:
                    index_of[key] = len(target.responses)
                    target.responses.append(list(response))
                indices.append(index_of[key])
            pair = tuple(indices)
            if pair[0] == pair[1]:
                identical += 1
            elif pair in seen:
                duplicates.append(group.source)
            else:
                seen.add(pair)
                target.pairs.append(pair)
    kept = [group for group, _, _ in merged.values() if group.pairs]
    return kept, duplicates, identical


def _drop_unlearnable_pairs(groups):
    """Drop the pairs DPO cannot learn from: an empty response (nothing to score) and identical
    chosen and rejected token ids (zero gradient, meaningless accuracy). Returns (groups, empty, identical)."""
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
        _warn_at(identical[0], f"dropped {len(identical)} pair(s) whose chosen and rejected token ids are identical "
                 f"(first: {identical[0]})")
    if empty:
        _warn_at(empty[0], f"dropped {len(empty)} pair(s) with an empty response (first: {empty[0]})")
    return kept_groups, len(empty), len(identical)


def _read_records(kind, path, options):
    counts = {"records": 0, "dropped_prompt_mismatch": 0}
    if kind == "lm_human_preferences":
        groups = load_lm_human_preferences(path, counts=counts, **options)
    elif kind == "jsonl":
        groups = load_jsonl(path, counts=counts, **options)
    elif kind == "hh":
        groups = load_hh(path, counts=counts, **options)
    elif kind == "hub":
        groups = load_hub(path, counts=counts, **options)
    elif kind == "demo":
        groups = make_demo_groups(**options)  # generated, so `path` is not used
        counts["records"] = len(groups)
    else:
        raise ConfigError(f"unknown preference data kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return groups, counts


def load_preferences(kind, path, append_eos=None, **options):
    """Load `path` as `kind` (one of KINDS): the records checked, the pairs DPO cannot learn from
    dropped (empty responses, identical chosen and rejected: counted and warned about), every
    response ended with <|endoftext|> when append_eos (None: the kind's default,
    APPEND_EOS_BY_DEFAULT), and the groups merged by prompt (group_by_prompt; exact duplicate pairs
    dropped, counted and warned about).

    Returns (groups, counts) with counts `records`, `groups`, `pairs`, `dropped_identical`,
    `dropped_empty`, `dropped_duplicate`, `dropped_prompt_mismatch`. options go to the loader (e.g.
    cache_dir/max_records, split/revision/hub_format for "hub", n_groups/seed for "demo").
    """
    groups, counts = _read_records(kind, path, options)
    groups, dropped_empty, dropped_identical = _drop_unlearnable_pairs(groups)
    if APPEND_EOS_BY_DEFAULT.get(kind, False) if append_eos is None else append_eos:
        for group in groups:
            group.responses = [response + [EOT_ID] for response in group.responses]
    n_sources = len(groups)
    groups, duplicates, _ = group_by_prompt(groups)
    if duplicates:
        _warn_at(duplicates[0], f"dropped {len(duplicates)} exact duplicate pair(s): same prompt, chosen and rejected "
                 f"as an earlier record (first: {duplicates[0]})")
    counts.update(groups=len(groups), pairs=sum(len(g.pairs) for g in groups), dropped_identical=dropped_identical,
                  dropped_empty=dropped_empty, dropped_duplicate=len(duplicates),
                  records_sharing_a_prompt=n_sources - len(groups))
    return groups, counts
