"""Tests for data/: loaders on hand-built files in each real format, the HH loader on the real sample,
error messages for bad input, truncation, splitting, ordering, sharding, collation and the demo set.

Expected token ids come from tiktoken directly, not from data.tokenizer, so a wrong encode shows up.
"""
import gzip
import io
import json
import os
import urllib.error
from pathlib import Path

import pytest
import tiktoken
import torch

from data import formats
from data.batches import (Pair, collate_pairs, epoch_order, grouped_epoch_order, pairs_of, rank_slice, split_groups,
                          truncate_groups)
from data.demo import write_demo_jsonl
from data.formats import (PreferenceGroup, load_hh, load_jsonl, load_lm_human_preferences, load_preferences,
                          make_demo_groups)
from errors import DataError

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str((SHARED_DATA / "tiktoken_cache").resolve())
ENC = tiktoken.get_encoding("gpt2")
PAD = 50259  # lm-human-preferences' pad id
PERIOD = 13  # GPT-2's id for "."


def tok(text):
    return ENC.encode_ordinary(text)


# -----------------------------------------------------------------------------
# lm-human-preferences offline_5k.json, built exactly as its README describes


def lmhp_sample(text):
    """(24 padded ids, expected ids after the loader): tokens after the first "." at or after position 16 become pads."""
    ids = tok(text)[:24]
    assert len(ids) == 24, f"test text too short for a 24-token sample: {text!r}"
    cut = next((i for i in range(16, 24) if ids[i] == PERIOD), None)
    if cut is None:
        return ids, ids
    return ids[:cut + 1] + [PAD] * (23 - cut), ids[:cut + 1]


def lmhp_record(query_text, sample_texts, best):
    query = tok(query_text)[:64]
    samples = [lmhp_sample(t) for t in sample_texts]
    record = {"query": query + [PAD] * (64 - len(query)), "best": best}
    record.update({f"sample{j}": padded for j, (padded, _) in enumerate(samples)})
    return record, query, [expected for _, expected in samples]


SAMPLE_TEXTS = [
    "The movie was a delight from start to finish and I would watch it again. Then we all went home to sleep and dream.",
    "Great. The film had some nice moments but it dragged in the middle and the ending fell flat. We left early that night.",
    "I did not enjoy it at all, the acting was wooden and the plot made no sense whatsoever to anyone in the room",
    "It was fine, nothing special, the kind of movie you forget by the next morning. Still, the popcorn was good.",
]
RECORDS = [
    lmhp_record("I went to see the new movie last night and", SAMPLE_TEXTS, best=2),
    lmhp_record("The restaurant on the corner", SAMPLE_TEXTS[::-1], best=0),
    lmhp_record("Yesterday my neighbour told me", SAMPLE_TEXTS[1:] + SAMPLE_TEXTS[:1], best=3),
]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_lm_human_preferences_loader(tmp_path):
    path = write_json(tmp_path / "offline_5k.json", [record for record, _, _ in RECORDS])
    # the test file must exercise both a cut sample and the early-period case
    assert any(PAD in record["sample0"] for record, _, _ in RECORDS) and tok(SAMPLE_TEXTS[1])[1] == PERIOD
    groups = load_lm_human_preferences(str(path))
    assert len(groups) == 3
    for index, (group, (record, query, samples)) in enumerate(zip(groups, RECORDS)):
        assert group.prompt == query
        assert group.responses == samples
        best = record["best"]
        assert sorted(group.pairs) == sorted((best, j) for j in range(4) if j != best)
        assert group.source == f"{path}[{index}]"
        assert all(PAD not in ids for ids in [group.prompt] + group.responses)
    groups, counts = load_preferences("lm_human_preferences", str(path), max_records=2)
    assert (counts["records"], counts["groups"], counts["pairs"]) == (2, 2, 6)


def test_lm_human_preferences_identical_samples_dropped(tmp_path):
    record, _, _ = lmhp_record("A query", SAMPLE_TEXTS, best=1)
    record["sample3"] = list(record["sample1"])  # rejected 3 == chosen 1
    path = write_json(tmp_path / "offline_5k.json", [RECORDS[0][0], record])
    with pytest.warns(UserWarning, match=r"dropped 1 pair.*identical.*offline_5k.json\[1\]"):
        groups, counts = load_preferences("lm_human_preferences", str(path))
    assert counts["dropped_identical"] == 1 and counts["pairs"] == 5
    _, _, samples = lmhp_record("A query", SAMPLE_TEXTS, best=1)
    kept = [(groups[1].responses[c], groups[1].responses[r]) for c, r in groups[1].pairs]
    assert kept == [(samples[1], samples[0]), (samples[1], samples[2])]


def test_lm_human_preferences_download(tmp_path, monkeypatch):
    payload = json.dumps([RECORDS[0][0]]).encode()
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(formats.urllib.request, "urlopen", fake_urlopen)
    groups = load_lm_human_preferences("sentiment", cache_dir=str(tmp_path))
    assert requested == ["https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/sentiment/offline_5k.json"]
    assert groups[0].prompt == RECORDS[0][1]
    cached = list(tmp_path.rglob("*"))
    assert [p.name for p in cached if p.is_file()] == ["offline_5k.json"]  # no temp file left behind
    load_lm_human_preferences("sentiment", cache_dir=str(tmp_path))  # second call reads the cache
    assert len(requested) == 1


def test_lm_human_preferences_offline_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(formats.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="by hand") as info:
        load_lm_human_preferences("descriptiveness", cache_dir=str(tmp_path))
    assert "labels/descriptiveness/offline_5k.json" in str(info.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written


# -----------------------------------------------------------------------------
# JSON lines and HH


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_loader(tmp_path):
    rows = [("Q: capital of France?\nA:", " Paris.", " Rome."), ("Say hi", " hi", " bye now")]
    path = write_lines(tmp_path / "prefs.jsonl", [json.dumps(dict(zip(("prompt", "chosen", "rejected"), rows[0]))), "",
                                                  "   ", json.dumps(dict(zip(("prompt", "chosen", "rejected"), rows[1])))])
    groups, counts = load_preferences("jsonl", str(path))
    eot = [50256]  # every response ends with <|endoftext|>, as the DPO authors' code and TRL have it
    assert [(g.prompt, g.responses, g.pairs) for g in groups] == [(tok(p), [tok(c) + eot, tok(r) + eot], [(0, 1)])
                                                                  for p, c, r in rows]
    groups, _ = load_preferences("jsonl", str(path), append_eos=False)
    assert [g.responses for g in groups] == [[tok(c), tok(r)] for _, c, r in rows]
    assert [g.source for g in groups] == [f"{path}:line 1", f"{path}:line 4"]
    assert (counts["records"], counts["pairs"], counts["dropped_identical"]) == (2, 2, 0)


def test_jsonl_identical_and_empty_dropped(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}),
        json.dumps({"prompt": "a", "chosen": " same", "rejected": " same"}),
        json.dumps({"prompt": "a", "chosen": "", "rejected": " c"}),
    ])
    with pytest.warns(UserWarning) as record:
        groups, counts = load_preferences("jsonl", str(path))
    messages = " ".join(str(w.message) for w in record)
    assert "identical" in messages and f"{path}:line 2" in messages and f"{path}:line 3" in messages
    assert (counts["records"], counts["groups"], counts["pairs"]) == (3, 1, 1)
    assert (counts["dropped_identical"], counts["dropped_empty"]) == (1, 1)
    assert groups[0].source == f"{path}:line 1"


def test_hh_loader_small(tmp_path):
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    good = {"chosen": prompt + " Fine, thanks.", "rejected": prompt + " Go away."}
    diverged = {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
                "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: D"}
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(diverged) + "\n")
    with pytest.warns(UserWarning, match=r"dropped 1 record.*hh.jsonl.gz:line 2"):
        groups, counts = load_preferences("hh", str(path))
    assert (counts["records"], counts["dropped_prompt_mismatch"], counts["groups"]) == (2, 1, 1)
    assert groups[0].prompt == tok(prompt)
    assert groups[0].responses == [tok(" Fine, thanks.") + [50256], tok(" Go away.") + [50256]]


def test_hh_loader_real_sample():
    if not HH_SAMPLE.is_file():
        pytest.skip(f"HH-RLHF sample not found at {HH_SAMPLE} (shared test data is absent on this machine)")
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
        originals = {i: json.loads(line) for i, line in enumerate(f, start=1)}
    with pytest.warns(UserWarning, match="dropped 5 record"):
        groups, counts = load_preferences("hh", str(HH_SAMPLE))
    assert counts["records"] == len(originals) == 2312
    assert counts["dropped_prompt_mismatch"] == 5
    assert counts["pairs"] == 2307
    # records that share a prompt are one group: count the distinct prompts of the kept records by hand
    cut = lambda text: text[:text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]  # noqa: E731
    kept_prompts = [cut(o["chosen"]) for o in originals.values() if cut(o["chosen"]) == cut(o["rejected"])]
    assert len(kept_prompts) == 2307 and counts["groups"] == len(groups) == len(set(kept_prompts)) < 2307
    texts = {(cut(o["chosen"]), o["chosen"], o["rejected"]) for o in originals.values()}
    for group in groups:
        prompt = ENC.decode(group.prompt)
        assert prompt.endswith("\n\nAssistant:")
        for chosen, rejected in group.pairs:
            assert group.responses[chosen][-1] == group.responses[rejected][-1] == 50256
            chosen_text, rejected_text = (ENC.decode(group.responses[i][:-1]) for i in (chosen, rejected))
            assert (prompt, prompt + chosen_text, prompt + rejected_text) in texts
            assert "\n\nAssistant:" not in chosen_text


# -----------------------------------------------------------------------------
# bad input: an error naming the file and the record, before any training


def lmhp_records_with(index, **changes):
    records = [dict(record) for record, _, _ in RECORDS]
    records[index].update(changes)
    for key, value in changes.items():
        if value is None:
            del records[index][key]
    return json.dumps(records)


GOOD_JSONL = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})
GOOD_HH = json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})
BAD_INPUTS = [  # (kind, file name, file text, record locator expected in the message)
    ("jsonl", "p.jsonl", GOOD_JSONL + "\n{not json\n", "line 2"),
    ("jsonl", "p.jsonl", GOOD_JSONL + "\n\n" + json.dumps({"prompt": "p", "chosen": " a"}), "line 3"),
    ("jsonl", "p.jsonl", json.dumps({"prompt": 5, "chosen": " a", "rejected": " b"}), "line 1"),
    ("jsonl", "p.jsonl", GOOD_JSONL + "\n[1, 2]", "line 2"),
    ("jsonl", "p.jsonl", "", "no records"),
    ("jsonl", "p.jsonl", "\n  \n", "no records"),
    ("hh", "h.jsonl", GOOD_HH + "\n" + json.dumps({"chosen": "x"}), "line 2"),
    ("hh", "h.jsonl", json.dumps({"chosen": ["x"], "rejected": "y"}), "line 1"),
    ("hh", "h.jsonl", GOOD_HH + "\n" + json.dumps({"chosen": "no turns", "rejected": "no turns"}), "line 2"),
    ("hh", "h.jsonl", "", "no records"),
    ("lm_human_preferences", "o.json", "[{", "o.json"),
    ("lm_human_preferences", "o.json", "[]", "no records"),
    ("lm_human_preferences", "o.json", json.dumps({"query": []}), "array"),
    ("lm_human_preferences", "o.json", lmhp_records_with(1, sample2=None), "[1]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(2, sample0="hello"), "[2]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(0, sample1=[1, "2", 3]), "[0]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(0, query=[True, False]), "[0]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(1, sample3=[50257] + [PAD] * 23), "[1]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(1, best="2"), "[1]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(1, best=1.0), "[1]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(2, best=4), "[2]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(0, best=-1), "[0]"),
    ("lm_human_preferences", "o.json", lmhp_records_with(0, best=None), "[0]"),
    ("lm_human_preferences", "o.json", json.dumps([RECORDS[0][0], 7]), "[1]"),
]


@pytest.mark.parametrize("kind, name, text, locator", BAD_INPUTS)
def test_bad_input_names_file_and_record(tmp_path, kind, name, text, locator):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_preferences(kind, str(path))
    assert str(path) in str(info.value) and locator in str(info.value)


def test_bad_gzip_and_missing_files(tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.jsonl.gz"):
        load_hh(str(broken))
    for loader in (load_jsonl, load_hh, load_lm_human_preferences):
        with pytest.raises(DataError, match="nowhere.json"):
            loader(str(tmp_path / "nowhere.json"))


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match="lm_human_preferences.*jsonl.*hh.*demo"):
        load_preferences("csv", "x.csv")


# -----------------------------------------------------------------------------
# batches


def test_truncate_groups():
    groups = [
        PreferenceGroup([1, 2, 3, 4, 5], [[10, 11, 12], [20], [30, 31]], [(0, 1), (0, 2)], "g0"),
        PreferenceGroup([1, 2], [[10, 11, 12, 13, 14, 15], [20, 21]], [(0, 1)], "g1"),
    ]
    truncated, dropped = truncate_groups(groups, max_prompt_len=3, max_len=5)
    assert dropped == 0
    assert truncated[0].prompt == [3, 4, 5] and truncated[0].responses == [[10, 11], [20], [30, 31]]
    assert truncated[1].prompt == [1, 2] and truncated[1].responses == [[10, 11, 12], [20, 21]]
    assert groups[0].prompt == [1, 2, 3, 4, 5]  # the input is not modified

    # an empty response, from the data or from truncation, drops its pairs; a group with none left goes
    groups = [
        PreferenceGroup([1, 2], [[10], [], [30]], [(0, 1), (0, 2), (2, 1)], "g0"),
        PreferenceGroup([1], [[], [20]], [(1, 0)], "g1"),
    ]
    truncated, dropped = truncate_groups(groups, max_prompt_len=4, max_len=8)
    assert dropped == 3 and len(truncated) == 1
    assert [(truncated[0].responses[c], truncated[0].responses[r]) for c, r in truncated[0].pairs] == [([10], [30])]
    with pytest.raises(ValueError, match="max_prompt_len"):
        truncate_groups(groups, max_prompt_len=8, max_len=8)


def demo_like_groups(n):
    return [PreferenceGroup([i], [[i, 1], [i, 2]], [(0, 1)], f"g{i}") for i in range(n)]


def test_split_groups_by_group_deterministic():
    groups = demo_like_groups(50)
    train, eval_ = split_groups(groups, 0.2, seed=3)
    assert len(eval_) == 10 and len(train) == 40
    assert {g.source for g in train}.isdisjoint(g.source for g in eval_)
    assert {g.source for g in train} | {g.source for g in eval_} == {g.source for g in groups}
    again_train, again_eval = split_groups(groups, 0.2, seed=3)
    assert [g.source for g in again_eval] == [g.source for g in eval_]
    assert [g.source for g in split_groups(groups, 0.2, seed=4)[1]] != [g.source for g in eval_]
    assert len(split_groups(demo_like_groups(2), 0.01, seed=0)[1]) == 1
    assert len(split_groups(demo_like_groups(5), 0.99, seed=0)[0]) == 1
    assert split_groups(groups, 0.0, seed=0) == (groups, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_groups(groups, 1.0, seed=0)


def test_pairs_of_keeps_group_index():
    groups = [PreferenceGroup([1], [[2], [3], [4]], [(0, 1), (0, 2)], "a"), PreferenceGroup([5], [[6], [7]], [(1, 0)], "b")]
    assert pairs_of(groups) == [Pair([1], [2], [3], 0, 0, 1), Pair([1], [2], [4], 0, 0, 2), Pair([5], [7], [6], 1, 1, 0)]


def test_epoch_order():
    order = epoch_order(100, seed=7, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=7, epoch=0)
    assert order != epoch_order(100, seed=7, epoch=1)
    assert order != epoch_order(100, seed=8, epoch=0)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    epoch_order(100, seed=7, epoch=2)
    assert torch.rand(1) == before  # torch's global RNG was not consumed


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_partition_global_batch(world_size):
    global_batch = list(range(100, 108))
    slices = [rank_slice(global_batch, rank, world_size) for rank in range(world_size)]
    assert all(len(s) == 8 // world_size for s in slices)
    assert sum(slices, []) == global_batch  # contiguous, disjoint, in rank order


def test_rank_slice_errors():
    with pytest.raises(ValueError, match="multiple of the world size"):
        rank_slice(list(range(6)), 0, 4)
    with pytest.raises(ValueError, match="rank 2"):
        rank_slice(list(range(4)), 2, 2)


def test_collate_pairs():
    pairs = [Pair([1, 2], [3], [4, 5, 6], 0, 0, 1), Pair([7], [8, 9], [10], 1, 0, 1)]
    batch = collate_pairs(pairs, pad_id=0)
    P = 0
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [
        [1, 2, 3, P, P],  # prompt + chosen, pair 0
        [7, 8, 9, P, P],  # prompt + chosen, pair 1
        [1, 2, 4, 5, 6],  # prompt + rejected, pair 0
        [7, 10, P, P, P],  # prompt + rejected, pair 1
    ]
    assert batch.attention_mask.dtype == torch.bool and batch.attention_mask.int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.dtype == torch.bool and batch.response_mask.int().tolist() == [
        [0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert collate_pairs(pairs).input_ids[0, 3] == 50256  # default pad: end-of-text
    with pytest.raises(ValueError):
        collate_pairs([])


# -----------------------------------------------------------------------------
# demo set


POSITIVE_CUES = ("loved", "enjoyed", "joy", "go back")
NEGATIVE_CUES = ("hated", "regretted", "never", "waste")


def test_demo_groups(tmp_path):
    groups = make_demo_groups(n_groups=40, seed=1)
    assert groups == make_demo_groups(n_groups=40, seed=1)
    assert groups != make_demo_groups(n_groups=40, seed=2)
    assert len({tuple(g.prompt) for g in groups}) == 40  # distinct prompts, so a split by group is by prompt
    for group in groups:
        assert 4 <= len(group.prompt) <= 12
        assert all(3 <= len(r) <= 10 for r in group.responses)
        assert all(group.responses[c] != group.responses[r] for c, r in group.pairs)
        for c, r in group.pairs:  # chosen reads positive, rejected negative
            chosen, rejected = ENC.decode(group.responses[c]), ENC.decode(group.responses[r])
            assert any(cue in chosen for cue in POSITIVE_CUES), chosen
            assert not any(cue in chosen for cue in NEGATIVE_CUES), chosen
            assert any(cue in rejected for cue in NEGATIVE_CUES), rejected
            assert not any(cue in rejected for cue in POSITIVE_CUES), rejected
    # the JSONL copy holds the same pairs, one per line
    path = tmp_path / "demo.jsonl"
    assert write_demo_jsonl(path, n_groups=40, seed=1) == 160
    from_jsonl = pairs_of(load_jsonl(str(path)))
    from_groups = pairs_of(groups)
    assert [(p.prompt, p.chosen, p.rejected) for p in from_jsonl] == [(p.prompt, p.chosen, p.rejected) for p in from_groups]
    _, counts = load_preferences("demo", None, n_groups=40, seed=1)
    assert (counts["records"], counts["pairs"], counts["dropped_identical"]) == (40, 160, 0)


def test_grouped_epoch_order_keeps_each_groups_pairs_together():
    groups = [PreferenceGroup([g], [[1], [2], [3]], [(0, 1), (0, 2), (1, 2)][: 1 + g % 3], f"g{g}") for g in range(20)]
    pairs = pairs_of(groups)
    order = grouped_epoch_order(pairs, seed=3, epoch=0)
    assert sorted(order) == list(range(len(pairs)))
    assert order == grouped_epoch_order(pairs, seed=3, epoch=0) != grouped_epoch_order(pairs, seed=3, epoch=1)
    runs = [pairs[i].group_index for i in order]
    starts = [g for k, g in enumerate(runs) if k == 0 or runs[k - 1] != g]
    assert len(starts) == len(set(starts)) == 20  # each group appears as one contiguous run
    assert starts != sorted(starts)  # and the groups are shuffled


def test_left_pad_ends_every_prompt_in_the_last_column():
    from data.batches import left_pad
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_pairs_of_one_prompt_share_a_slot_only_when_they_share_the_response():
    from data.batches import collate_pairs_shared_prompt
    a, b, c = [11, 12], [13], [14, 15, 16]
    groups = [PreferenceGroup([1, 2, 3], [a, b, c], [(0, 1), (0, 2), (2, 1)], "g")]
    packed = collate_pairs_shared_prompt(pairs_of(groups))
    chosen, rejected = packed.chosen_slot.tolist(), packed.rejected_slot.tolist()
    slot_tokens = packed.target_ids.split(packed.slot_lengths.tolist())
    assert len(slot_tokens) == 3  # three distinct responses, each once
    for pair, (c_slot, r_slot) in zip(pairs_of(groups), zip(chosen, rejected)):
        assert slot_tokens[c_slot].tolist() == pair.chosen and slot_tokens[r_slot].tolist() == pair.rejected
    assert chosen[0] == chosen[1] and rejected[2] == rejected[0] and rejected[1] == chosen[2]


def test_hand_built_pairs_must_name_their_responses():
    from data.batches import collate_pairs_shared_prompt
    with pytest.raises(TypeError):
        Pair([1], [2], [3], 0)  # no default slot indices: two such pairs would silently collide
    colliding = [Pair([1, 2], [3], [4], 0, 0, 1), Pair([1, 2], [5], [6], 0, 0, 1)]
    with pytest.raises(ValueError, match="group 0 name response 0 but hold different tokens"):
        collate_pairs_shared_prompt(colliding)


def test_imdb_prompts_are_2_to_8_token_prefixes_of_the_long_reviews_and_texts_every_review(tmp_path):
    """data/imdb.py on a local copy laid out as the hub's stanfordnlp/imdb: reviews of 200
    characters or fewer are skipped (TRL's recipe), every prompt is the start of a review and 2 to 8
    GPT-2 tokens long, the file reads back as prompts, and the same seed writes the same file.
    `texts` writes every review, short ones too, in order, as SFT's plain text reads them."""
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet
    from data.imdb import main
    from data.texts import load_texts
    from data.records import read_prompts
    from data.tokenizer import encode
    long_reviews = [f"Review number {i}: this film was {'good' if i % 2 else 'bad'}, " + "and so on " * 30
                    for i in range(40)]
    (tmp_path / "imdb" / "plain_text").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.table({"text": long_reviews + ["Too short to keep."], "label": [0] * 41}),
                                tmp_path / "imdb" / "plain_text" / "test-00000-of-00001.parquet")
    out = tmp_path / "test_prompts.jsonl"
    main(["prompts", "--split", "test", "--dataset", str(tmp_path / "imdb"), "--out", str(out)])
    prompts = read_prompts(str(out))
    assert 20 <= len(prompts) == len(set(prompts)) and "Too short" not in "".join(prompts)  # distinct prefixes
    assert all(2 <= len(encode(p)) <= 8 and any(r.startswith(p) for r in long_reviews) for p in prompts)
    assert len({len(encode(p)) for p in prompts}) > 3  # the lengths are drawn, not fixed
    first = out.read_text()
    main(["prompts", "--split", "test", "--dataset", str(tmp_path / "imdb"), "--out", str(out)])
    assert out.read_text() == first
    main(["texts", "--split", "test", "--dataset", str(tmp_path / "imdb"), "--out", str(tmp_path / "texts.jsonl")])
    groups, _ = load_texts(str(tmp_path / "texts.jsonl"), max_len=1000)
    assert [group.responses[0] for group in groups] == [encode(r) + [50256] for r in long_reviews + ["Too short to keep."]]
