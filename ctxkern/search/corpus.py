"""Reading a corpus for `ctxkern index build` and `ctxkern search`: one document per line of a file or of stdin,
or one field of each line of a JSONL file. Empty lines (and empty fields) are skipped and counted; every
document keeps its 1-based line number, so that results point back into the file."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Corpus:
    texts: list[str]
    lines: list[int]            # the 1-based line number of each text in the source
    skipped: int                # empty lines (or empty JSONL fields) left out
    name: str                   # the file's path, or "<stdin>"


def read_corpus_file(source, *, jsonl_field: Optional[str] = None, stdin=None) -> Corpus:
    """source: a path, or "-" for stdin (bytes from `stdin`, default sys.stdin.buffer). A line that is not
    UTF-8, or in JSONL mode not a JSON object with a string `jsonl_field`, is an error naming the line."""
    if str(source) == "-":
        name, data = "<stdin>", (stdin if stdin is not None else sys.stdin.buffer).read()
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus {path}: no such file")
        data = path.read_bytes()
    texts, lines, skipped = [], [], 0
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus {name}, line {number}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        text = line.strip() if jsonl_field is None else _field(line, jsonl_field, name, number)
        if not text:
            skipped += 1
            continue
        texts.append(text)
        lines.append(number)
    if not texts:
        raise ValueError(f"corpus {name}: holds no document ({skipped} empty lines skipped; one document per line"
                         + (f", or a JSONL object with the field {jsonl_field!r} per line" if jsonl_field else "")
                         + ", expected)")
    return Corpus(texts, lines, skipped, name)


def _field(line: str, field: str, name: str, number: int) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"corpus {name}, line {number}: not JSON ({err.msg}) but --jsonl-field was given") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"corpus {name}, line {number}: no field {field!r} in this JSON "
                         f"{'object' if isinstance(record, dict) else type(record).__name__}")
    if not isinstance(record[field], str):
        raise ValueError(f"corpus {name}, line {number}: field {field!r} is a {type(record[field]).__name__}, "
                         "not a string")
    return record[field].strip()
