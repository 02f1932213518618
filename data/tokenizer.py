"""GPT-2's BPE through tiktoken: encode, decode and the end-of-text id.

tiktoken downloads `vocab.bpe` and `encoder.json` on first use and caches them in
TIKTOKEN_CACHE_DIR. On a machine without internet, point TIKTOKEN_CACHE_DIR at a
copy; when it is unset and the checkout sits beside `shared/data/tiktoken_cache`
(this project's CI layout), that copy is used.
"""
import functools
import os

import tiktoken

EOT_ID = 50256  # <|endoftext|>: GPT-2's only special token; also our pad id (always masked)
VOCAB_SIZE = 50257

_SHARED_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tiktoken_cache")


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_SHARED_CACHE):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.normpath(_SHARED_CACHE)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # network errors come in many types; re-raised with the fix
        raise RuntimeError(
            "could not load tiktoken's GPT-2 encoding (it downloads vocab.bpe and encoder.json on "
            "first use). Offline? Set TIKTOKEN_CACHE_DIR to a directory holding the cached files "
            f"(see README, 'Offline use'). TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR')!r}. "
            f"Cause: {type(err).__name__}: {err}"
        ) from err


def encode(text: str) -> list[int]:
    """Text to GPT-2 token ids. `<|endoftext|>` in the text is encoded as ordinary characters."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """Token ids to text; ids outside the vocabulary (pads such as 50259) are dropped."""
    return get_encoding().decode([int(i) for i in ids if 0 <= int(i) < VOCAB_SIZE])
