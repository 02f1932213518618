"""data/formats.py on the formats DPO users already have, against files built here by hand and ids
from tiktoken directly: TRL's explicit, implicit-prompt and conversational records, a hub dataset
laid out as huggingface_hub caches it (offline), the end-of-text convention, and grouping by prompt,
checked end to end through the trainer's split: no held-out prompt is ever trained on."""
import gzip
import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import tiktoken

from data.formats import load_preferences
from errors import ConfigError, DataError
from fsdp_train import load_data
from train.config import TrainConfig

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str((SHARED_DATA / "tiktoken_cache").resolve())
ENC = tiktoken.get_encoding("gpt2")
EOT = 50256


def tok(text):
    return ENC.encode_ordinary(text)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def pair_ids(group):
    """A group's pairs as (prompt, chosen, rejected) token ids: what a pair means, whatever its indices."""
    return [(group.prompt, group.responses[c], group.responses[r]) for c, r in group.pairs]


# ----------------------------------------------------------------------------- TRL's formats

def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_trls_four_preference_formats_and_the_end_of_text_token(tmp_path):
    """Each record as TRL's DPOTrainer tokenizes it for GPT-2: prompt ids unchanged, each response's
    ids + 50256. Conversations are rendered in HH's plain form."""
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."},  # explicit
        {"chosen": "The sky is blue today.", "rejected": "The sky is green today."},  # implicit prompt
        {"prompt": [user("Hi!")], "chosen": [assistant("Hello, how can I help?")],  # conversational
         "rejected": [assistant("Go away.")]},
        {"chosen": [user("Tell me a joke."), assistant("Why did the chicken cross the road?")],  # implicit conv.
         "rejected": [user("Tell me a joke."), assistant("No.")]},
    ])
    groups, counts = load_preferences("jsonl", str(path))
    expected = [
        ("The capital of France is", " Paris.", " Rome."),
        ("The sky is", " blue today.", " green today."),  # TRL's common prefix; the space goes with the responses
        ("\n\nHuman: Hi!\n\nAssistant:", " Hello, how can I help?", " Go away."),
        ("\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did the chicken cross the road?", " No."),
    ]
    assert [pair_ids(g) for g in groups] == [[(tok(p), tok(c) + [EOT], tok(r) + [EOT])] for p, c, r in expected]
    assert counts["records"] == counts["pairs"] == 4


@pytest.mark.parametrize("record, message", [
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "prompt is empty"),
    ({"chosen": "Yes.", "rejected": "No."}, "share no prefix"),
    ({"chosen": [assistant("Yes.")], "rejected": [assistant("No.")]}, "share no leading message"),
    ({"prompt": [user("q")], "chosen": [assistant("a"), user("b")], "rejected": [assistant("c")]},
     "exactly one assistant message"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "role one of"),
    ({"prompt": "q", "chosen": [assistant("a")], "rejected": " b"}, "must both be strings or both message lists"),
    ({"prompt": "q", "chosen": 3, "rejected": " b"}, "string or a list of messages"),
])
def test_bad_trl_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " b"}, record])
    with pytest.raises(DataError, match=message) as info:
        load_preferences("jsonl", str(path))
    assert f"{path}:line 2" in str(info.value)


def test_bad_bytes_and_deep_nesting_name_the_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": " a", "rejected": " b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:line 2: not UTF-8 \(byte 0xff at column 13\)"):
        load_preferences("jsonl", str(path))
    path.write_text('{"prompt": "q", "chosen": " a", "rejected": " b"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:line 2: JSON nested too deeply"):
        load_preferences("jsonl", str(path))


def test_append_eos_off_and_truncation_cuts_the_end_of_text(tmp_path):
    from data.batches import truncate_groups
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "One two", "chosen": " three four", "rejected": " five"}])
    groups, _ = load_preferences("jsonl", str(path), append_eos=False)
    assert pair_ids(groups[0]) == [(tok("One two"), tok(" three four"), tok(" five"))]
    groups, _ = load_preferences("jsonl", str(path))
    prompt = tok("One two")
    # room for 2 response tokens: " three four" + EOT (3) is cut and loses its EOT (it did not end);
    # " five" + EOT (2) fits whole
    truncated, _ = truncate_groups(groups, max_prompt_len=len(prompt), max_len=len(prompt) + 2)
    assert pair_ids(truncated[0]) == [(prompt, tok(" three four")[:2], tok(" five") + [EOT])]


# ----------------------------------------------------------------------------- grouping by prompt

def test_records_sharing_a_prompt_are_one_group_and_duplicates_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Rate the film:", "chosen": " great", "rejected": " bad"},
        {"prompt": "Other prompt", "chosen": " yes", "rejected": " no"},
        {"prompt": "Rate the film:", "chosen": " great", "rejected": " awful"},
        {"prompt": "Rate the film:", "chosen": " great", "rejected": " bad"},  # exact duplicate of line 1
    ])
    with pytest.warns(UserWarning, match=r"dropped 1 exact duplicate.*prefs.jsonl:line 4") as warned:
        groups, counts = load_preferences("jsonl", str(path))
    assert warned[0].filename == str(path) and warned[0].lineno == 4  # the warning points at the user's record
    assert (counts["records"], counts["groups"], counts["pairs"], counts["dropped_duplicate"]) == (4, 2, 3, 1)
    film = groups[0]
    assert len(film.responses) == 3  # " great" once, run once for both of its pairs
    e = [EOT]
    assert pair_ids(film) == [(tok("Rate the film:"), tok(" great") + e, tok(" bad") + e),
                              (tok("Rate the film:"), tok(" great") + e, tok(" awful") + e)]


def lmhp_record(query, samples, best):
    pad = 50259
    return {"query": tok(query) + [pad] * 3, "best": best,
            **{f"sample{j}": tok(text) + [pad] * 2 for j, text in enumerate(samples)}}


def repeated_prompt_files(tmp_path, n_prompts=40, records_per_prompt=4):
    """One file per format, each with n_prompts prompts appearing on records_per_prompt records."""
    prompts = [f"Prompt number {i} asks:" for i in range(n_prompts)]
    lines = [(p, f" answer {k} is good", f" answer {k} is bad") for k in range(records_per_prompt) for p in prompts]
    jsonl = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in lines])
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        for p, c, r in lines:
            turn = f"\n\nHuman: {p}\n\nAssistant:"
            f.write(json.dumps({"chosen": turn + c, "rejected": turn + r}) + "\n")
    lmhp = tmp_path / "offline_5k.json"
    lmhp.write_text(json.dumps([lmhp_record(p, [f" reply {k} {j}." for j in range(4)], best=k % 4)
                                for k in range(records_per_prompt) for p in prompts]))
    return {"jsonl": jsonl, "hh": hh, "lm_human_preferences": lmhp}


@pytest.mark.parametrize("dataset", ["jsonl", "hh", "lm_human_preferences", "hub", "demo"])
def test_no_held_out_prompt_is_trained_on(tmp_path, monkeypatch, dataset):
    """40 prompts x 4 records, a fifth held out: every held-out prompt's ids are absent from the
    training pairs, and all 4 records of a prompt land on one side."""
    files = repeated_prompt_files(tmp_path)
    data_path = ""
    if dataset == "hub":
        data_path = hub_snapshot(tmp_path, monkeypatch, {"data/train-00000-of-00001.jsonl": files["jsonl"].read_text()})
    elif dataset != "demo":
        data_path = str(files[dataset])
    cfg = TrainConfig(dataset=dataset, data_path=data_path, eval_fraction=0.2, batch_size=8, max_prompt_len=16,
                      max_len=32, init_from="scratch")
    train_pairs, eval_pairs, counts, _ = load_data(cfg)
    train_prompts = {tuple(p.prompt) for p in train_pairs}
    eval_prompts = {tuple(p.prompt) for p in eval_pairs}
    assert eval_prompts and train_prompts.isdisjoint(eval_prompts)
    if dataset != "demo":
        assert counts["eval_prompts"] == len(eval_prompts) == 8 and len(train_prompts) == 32
        pairs_per_prompt = 3 * 4 if dataset == "lm_human_preferences" else 4
        assert len(eval_pairs) == 8 * pairs_per_prompt and len(train_pairs) == 32 * pairs_per_prompt


# ----------------------------------------------------------------------------- a hub dataset, offline

def hub_snapshot(tmp_path, monkeypatch, files, repo="org/prefs", revisions=None):
    """A dataset repo laid out as huggingface_hub caches it; HF_HUB_OFFLINE on, the cache pointed here."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"datasets--{repo.replace('/', '--')}"
    for ref, (commit, ref_files) in {"main": ("a" * 40, files), **(revisions or {})}.items():
        for name, text in ref_files.items():
            (repo_dir / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (repo_dir / "snapshots" / commit / name).write_text(text)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo


def test_hub_dataset_reads_the_split_and_revision_from_the_cache(tmp_path, monkeypatch):
    def line(prompt):
        return json.dumps({"prompt": prompt, "chosen": " a", "rejected": " b"}) + "\n"
    repo = hub_snapshot(tmp_path, monkeypatch, {
        "data/train-00000-of-00002.jsonl": line("train one"), "data/train-00001-of-00002.json": line("train two"),
        "data/test-00000-of-00001.jsonl": line("test"), "README.md": "# a dataset card\n",
    }, revisions={"v1": ("b" * 40, {"train.jsonl": line("old train")})})
    groups, _ = load_preferences("hub", repo)
    assert [g.prompt for g in groups] == [tok("train one"), tok("train two")]
    groups, _ = load_preferences("hub", repo, split="test")
    assert [g.prompt for g in groups] == [tok("test")]
    groups, _ = load_preferences("hub", repo, revision="v1")
    assert [g.prompt for g in groups] == [tok("old train")]
    with pytest.raises(DataError, match="no .* files for split 'validation'"):
        load_preferences("hub", repo, split="validation")
    with pytest.raises(DataError, match="could not fetch the dataset 'org/missing'.*HF_HUB_OFFLINE"):
        load_preferences("hub", "org/missing")


def test_hub_hh_dataset_in_a_subdirectory(tmp_path, monkeypatch):
    turn = "\n\nHuman: Hello?\n\nAssistant:"
    record = json.dumps({"chosen": turn + " Hi there.", "rejected": turn + " What?"}) + "\n"
    repo = hub_snapshot(tmp_path, monkeypatch, {"harmless-base/train.jsonl": record,
                                                "helpful-base/train.jsonl": record.replace("Hello", "Help")})
    groups, counts = load_preferences("hub", f"{repo}/harmless-base", hub_format="hh")
    assert pair_ids(groups[0]) == [(tok(turn), tok(" Hi there.") + [EOT], tok(" What?") + [EOT])]
    assert counts["records"] == 1


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    directory = tmp_path / "local_repo"
    (directory / "data").mkdir(parents=True)
    (directory / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="train-00000-of-00001.parquet: reading Parquet needs pyarrow"):
        load_preferences("hub", str(directory))
