"""Data files to JSON records, each named by file and line (or index) for messages: JSON lines
(.jsonl, .jsonl.gz), a JSON array (.json), Parquet (with pyarrow, an optional extra).
The loaders in data/formats.py turn records into preference groups. And prompt files (read_prompts):
generate_pairs.py's prompts, the trainer's eval_prompts."""
import gzip
import json
import os

from errors import ConfigError, DataError


def check_exists(path):
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r} "
                        f"(check the path; relative paths start at {os.getcwd()!r})")


def read_lines(path):
    """(line number, text) of the non-blank lines of a .jsonl or .jsonl.gz file, each decoded as
    UTF-8 on its own so that a bad byte is reported by line."""
    check_exists(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw_lines = list(enumerate(f, start=1))
    except (OSError, EOFError) as err:  # bad or truncated gzip stream, unreadable file, ...
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    lines = []
    for number, raw in raw_lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:line {number}: not UTF-8 (byte {raw[err.start]:#04x} at column "
                            f"{err.start + 1})") from err
        if text.strip():
            lines.append((number, text))
    if not lines:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return lines


def parse_json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if err.lineno == 1 else f"line {err.lineno} column {err.colno}"
        raise DataError(f"{where}: malformed JSON ({err.msg} at {at})") from err
    except RecursionError as err:
        raise DataError(f"{where}: JSON nested too deeply to be a preference record") from err


def json_records(path):
    """[(record, where)] from JSON lines (.jsonl, .jsonl.gz, or .json holding lines) or a .json
    file holding one array of records."""
    lines = read_lines(path)
    if path.endswith(".json") and lines[0][1].lstrip().startswith("["):
        records = parse_json("".join(text for _, text in lines), path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records or JSON lines")
        named = [(record, f"{path}[{index}]") for index, record in enumerate(records)]
    else:
        named = [(parse_json(text, f"{path}:line {number}"), f"{path}:line {number}") for number, text in lines]
    for record, where in named:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not named:
        raise DataError(f"{path}: no records")
    return named


def parquet_records(path):
    try:
        import pyarrow.parquet
    except ImportError as err:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow, an optional extra: pip install pyarrow "
                          "(or use the dataset's JSON lines files)") from err
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's own error types: a damaged or non-Parquet file
        raise DataError(f"{path}: cannot be read as Parquet ({type(err).__name__}: {err})") from err
    return [(row, f"{path}[{index}]") for index, row in enumerate(rows)]


def read_prompts(path) -> list[str]:
    """Distinct prompts in file order: a .txt file's non-blank lines, or each JSONL line's "prompt"."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read prompts ({err})") from err
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.endswith(".txt"):
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise DataError(f"{path}:{number}: not a JSON line ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise DataError(f"{path}:{number}: expected an object with a non-empty \"prompt\" string")
        prompts.append(record["prompt"])
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
