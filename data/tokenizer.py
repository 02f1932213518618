"""GPT-2's BPE through tiktoken: encode, decode and the end-of-text id. Nothing is downloaded.

tiktoken's own `get_encoding("gpt2")` fetches GPT-2's two BPE files on first use, which fails on a
machine without internet. The project ships them instead, in data/gpt2_bpe/ (OpenAI's modified MIT
licence, see LICENSE there): `vocab.bpe` (the merges, in priority order) and `encoder.json` (token ->
id; read only by the export, which writes it as vocab.json). Each is checked against the sha256 that
tiktoken checks, then the encoding is built here as tiktoken_ext/openai_public.py builds "gpt2": the
same ranks, split pattern and special token, so the ids are tiktoken's.
"""
import functools
import hashlib
import os

import tiktoken

from errors import InputError

EOT_ID = 50256  # <|endoftext|>: GPT-2's only special token; also our pad id (always masked)
VOCAB_SIZE = 50257

BPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_bpe")
SHA256 = {  # the hashes tiktoken_ext/openai_public.py expects of the downloaded files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's r50k_pat_str (>= 0.8): GPT-2's original split pattern with possessive quantifiers,
# which gives the same pieces faster.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_file(name: str) -> str:
    """The path of one of the two shipped files (vocab.bpe, encoder.json)."""
    return os.path.join(BPE_DIR, name)


def read_bpe_file(name: str) -> bytes:
    """The file's bytes, after checking its sha256: a damaged or replaced file would give other ids."""
    path = bpe_file(name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"{path}: cannot read GPT-2's tokenizer file ({err.strerror}); it ships with the "
                         "project: restore it from the repository") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise InputError(f"{path}: sha256 {digest[:16]}... is not that of GPT-2's {name} ({SHA256[name][:16]}...): "
                         "the file is damaged or was replaced; restore it from the repository")
    return data


def mergeable_ranks(vocab_bpe: bytes) -> dict[bytes, int]:
    """vocab.bpe -> tiktoken's ranks, as tiktoken.load.data_gym_to_mergeable_bpe_ranks builds them.

    GPT-2 writes bytes as printable characters: the 188 printable bytes other than space stand for
    themselves, the other 68 for chr(256 + n) in byte order. Ranks 0..255 are the single bytes in
    that order, then each merge (two tokens joined) gets the next rank. encoder.json holds the same
    ids (its sha256 is checked against the pair tiktoken verifies together)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rank_to_byte = printable + [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte |= {chr(256 + n): b for n, b in enumerate(rank_to_byte[len(printable):])}
    ranks = {bytes([b]): rank for rank, b in enumerate(rank_to_byte)}
    merges = vocab_bpe.decode().split("\n")[1:-1]  # line 0 is "#version: 0.2"; the file ends with "\n"
    for merge in merges:
        first, second = merge.split()
        ranks[bytes(char_to_byte[c] for c in first + second)] = len(ranks)
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    read_bpe_file("encoder.json")  # checked here too: the export copies it as vocab.json
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks(read_bpe_file("vocab.bpe")),
                             special_tokens={"<|endoftext|>": EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


def encode(text: str) -> list[int]:
    """Text to GPT-2 token ids. `<|endoftext|>` in the text is encoded as ordinary characters."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """Token ids to text; ids outside the vocabulary (pads such as 50259) are dropped."""
    return get_encoding().decode([int(i) for i in ids if 0 <= int(i) < VOCAB_SIZE])
