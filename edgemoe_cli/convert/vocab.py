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


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited fields."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("message ends early")
        yield field, wire, value


def read_sentencepiece(path: Path) -> list[tuple[bytes, float, int]]:
    """(piece as UTF-8 bytes, score, type) for every piece of a SentencePiece model file."""
    try:
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
            piece, score, kind = b"", 0.0, NORMAL
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    piece = bytes(v)
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
    except (ValueError, IndexError, struct.error) as e:
        raise EdgeMoEError(f"tokenizer {path} is not a SentencePiece model ({e})", "download tokenizer.model again") from e
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
    pieces = read_sentencepiece(src / "tokenizer.model")
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
        for text, token_id in _json(added).items():
            if token_id < n:
                tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, USER_DEFINED

    config = src / "tokenizer_config.json"
    if config.is_file():
        for token_id, data in _json(config).get("added_tokens_decoder", {}).items():
            token_id, text = int(token_id), data["content"]
            if token_id >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[token_id] = CONTROL
            else:
                text = text.replace("\u2581", " ")  # user-defined spaces are stored pre-normalized
                types[token_id] = USER_DEFINED
            scores[token_id], tokens[token_id] = -1000.0, text.encode()
    return tokens, scores, types


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeMoEError(f"{path} is not valid JSON ({e})", f"fix or re-download {path.name}") from e
