"""data/tokenizer.py: tiktoken's GPT-2 ids from the two files the project ships, with no network and
no tiktoken cache; a damaged file is a one-line error naming it."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA
from data import tokenizer
from errors import InputError

TEXT = ("Honestly, the hotel was great! I'd stay again in 2024 \u2014 5\u2605, na\u00efve caf\u00e9\u2026\n\n"
        "  \u65e5\u672c\u8a9e \U0001F600\ttabs <|endoftext|> don't")
# tiktoken.get_encoding("gpt2").encode_ordinary(TEXT), for machines without the shared tiktoken cache
TEXT_IDS = [40817, 11, 262, 7541, 373, 1049, 0, 314, 1549, 2652, 757, 287, 48609, 851, 642, 15583, 11, 41492, 40304,
            1399, 628, 220, 10545, 245, 98, 17312, 105, 45739, 252, 30325, 222, 197, 8658, 82, 1279, 91, 437, 1659,
            5239, 91, 29, 836, 470]

# Runs in a fresh interpreter: every way out to the network raises, and so does tiktoken's downloader.
OFFLINE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import tiktoken.load
tiktoken.load.read_file = tiktoken.load.read_file_cached = refuse
sys.path.insert(0, sys.argv[1])
from data.tokenizer import decode, encode
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [encode(t) for t in texts], "round_trip": [decode(encode(t)) == t for t in texts]}))
"""


def reference_ids(text):
    """tiktoken's own GPT-2 encoding from the shared cache, else the ids recorded above."""
    if not (SHARED_DATA / "tiktoken_cache").is_dir():
        assert text == TEXT
        return TEXT_IDS
    import tiktoken_ext.openai_public  # tiktoken's recipe for "gpt2", reading the cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
        import tiktoken
        return tiktoken.Encoding(**tiktoken_ext.openai_public.gpt2()).encode_ordinary(text)


def test_tokenizes_as_tiktoken_with_no_network_and_an_empty_cache(tmp_path):
    cache = tmp_path / "tiktoken_cache"
    cache.mkdir()
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", OFFLINE, str(ROOT), json.dumps(["Hello world", TEXT])],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["ids"] == [[15496, 995], reference_ids(TEXT)]
    assert out["round_trip"] == [True, True]
    assert list(cache.iterdir()) == []  # nothing fetched or cached


def test_recorded_ids_match_tiktoken():
    assert reference_ids(TEXT) == TEXT_IDS == tokenizer.encode(TEXT)


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_a_damaged_tokenizer_file_is_one_line_naming_it(tmp_path, monkeypatch, name):
    for file in ("vocab.bpe", "encoder.json"):
        (tmp_path / file).write_bytes((ROOT / "data" / "gpt2_bpe" / file).read_bytes())
    with open(tmp_path / name, "ab") as f:
        f.write(b" ")
    monkeypatch.setattr(tokenizer, "BPE_DIR", str(tmp_path))
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(InputError) as err:
            tokenizer.encode("Hello world")
    finally:
        tokenizer.get_encoding.cache_clear()  # the next caller builds it from the shipped files
    message = str(err.value)
    assert str(tmp_path / name) in message and "sha256" in message and "\n" not in message
