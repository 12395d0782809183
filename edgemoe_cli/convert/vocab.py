"""SentencePiece vocabulary from tokenizer.model without the sentencepiece package.

tokenizer.model is a protobuf `ModelProto`; the vocabulary is its repeated field 1, each `SentencePiece` holding
piece (1, string), score (2, float) and type (3, enum). Decoding just those fields is a few lines of wire format,
which spares a compiled dependency at runtime. Token scores, types and the added-token overrides follow llama.cpp's
converter (`_create_vocab_sentencepiece`) so the GGUF vocabulary is identical.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import EdgeMoEError

# SentencePiece's piece types, which are also GGUF's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# A protobuf varint encodes at most 64 bits: 10 bytes. Without the cap a run of 0xFF bytes is read as one ever
# larger integer (quadratic time in the run's length).
MAX_VARINT_BYTES = 10
# tokenizer.model files are a few MB (ERNIE-4.5's: 1.6 MB); a reader that allocates per piece stops far above that
MAX_TOKENIZER_BYTES = 64 << 20


def _varint(buf, pos: int) -> tuple[int, int]:
    result = 0
    for i in range(MAX_VARINT_BYTES):
        if pos >= len(buf):
            raise ValueError("message ends inside a varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return result, pos
    raise ValueError(f"varint longer than {MAX_VARINT_BYTES} bytes")


def _fields(buf):
    """(field number, wire type, value) of one protobuf message; value is a memoryview for length-delimited
    fields (no copy: nested messages are views of the one buffer). Every length is checked against what is left."""
    buf = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise ValueError("message ends early")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if n > end - pos:
                raise ValueError(f"a field of {n} bytes runs past the end of its message")
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_sentencepiece(path: Path, limit: int | None = None) -> list[tuple[bytes, float, int]]:
    """(piece as UTF-8 bytes, score, type) for every piece of a SentencePiece model file, the first `limit` only
    when given (llama.cpp's converter ignores pieces beyond the model's vocab_size too)."""
    try:
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise EdgeMoEError(
                f"tokenizer {path} is {path.stat().st_size:,} bytes, more than a SentencePiece "
                f"model's {MAX_TOKENIZER_BYTES:,} at most",
                "download tokenizer.model again",
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise EdgeMoEError(f"tokenizer {path} is missing", "download tokenizer.model with the checkpoint") from None
    except OSError as e:
        raise EdgeMoEError(f"cannot read tokenizer {path}: {e.strerror}", "check the file's permissions") from e
    pieces = []
    try:
        for field, wire, value in _fields(data):
            if field != 1 or wire != 2:
                continue
            if limit is not None and len(pieces) >= limit:
                break
            piece, score, kind = b"", 0.0, NORMAL
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    piece = bytes(v)
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
    except (ValueError, IndexError, struct.error) as e:  # the reader's own checks, all ValueError
        raise EdgeMoEError(
            f"tokenizer {path} is not a SentencePiece model ({e})", "download tokenizer.model again"
        ) from e
    if not pieces:
        raise EdgeMoEError(f"tokenizer {path} holds no pieces", "download tokenizer.model again")
    return pieces


def _looks_special(token: str) -> bool:
    # llama.cpp's converter treats these added tokens as control even when tokenizer_config says not special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def build_vocab(src: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """tokens, scores, token types for GGUF: tokenizer.model, then added_tokens.json and added_tokens_decoder."""
    pieces = read_sentencepiece(src / "tokenizer.model", vocab_size)
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i, (piece, score, kind) in enumerate(pieces[:n]):
        tokens[i], scores[i] = piece, score
        # llama.cpp keeps only these four distinctions; user-defined pieces stay NORMAL
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL

    added = src / "added_tokens.json"
    if added.is_file():
        for text, token_id in read_json_object(added).items():
            if type(token_id) is not int or token_id < 0:
                raise EdgeMoEError(
                    f"{added}: token {text!r} has id {token_id!r}, not a non-negative whole number",
                    "fix or re-download added_tokens.json",
                )
            if token_id < n:
                tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, USER_DEFINED

    config = src / "tokenizer_config.json"
    if config.is_file():
        decoder = read_json_object(config).get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise EdgeMoEError(f"{config}: added_tokens_decoder is not an object", "fix or re-download it")
        for key, data in decoder.items():
            try:
                token_id = int(key)
            except ValueError:
                token_id = -1
            if token_id < 0 or not key.isdigit():
                raise EdgeMoEError(
                    f"{config}: added_tokens_decoder key {key!r} is not a token id",
                    "fix or re-download tokenizer_config.json",
                )
            if not isinstance(data, dict) or not isinstance(data.get("content"), str):
                raise EdgeMoEError(
                    f"{config}: added token {key} has no string `content`", "fix or re-download tokenizer_config.json"
                )
            text = data["content"]
            if token_id >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[token_id] = CONTROL
            else:
                text = text.replace("\u2581", " ")  # user-defined spaces are stored pre-normalized
                types[token_id] = USER_DEFINED
            scores[token_id], tokens[token_id] = -1000.0, text.encode()
    return tokens, scores, types


def read_json_object(path: Path) -> dict:
    """A tokenizer JSON file that must hold an object; anything else is a one-line error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeMoEError(f"{path} is not valid JSON ({e})", f"fix or re-download {path.name}") from e
    if not isinstance(data, dict):
        raise EdgeMoEError(
            f"{path} holds a JSON {type(data).__name__}, not an object", f"fix or re-download {path.name}"
        )
    return data
