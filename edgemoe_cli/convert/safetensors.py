"""Read Hugging Face safetensors checkpoints with numpy alone (no torch, no safetensors package).

A checkpoint is one `model.safetensors` or shards listed by `model.safetensors.index.json`. Every header is checked
against its file's size before anything is read, so a truncated download is a one-line error, not a crash halfway
through a conversion. Tensors are read a block of rows at a time through mmap and released once written, so the
resident set stays near a few blocks, not the file.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element). bf16 has no numpy dtype: its bits are
# read as uint16 and widened by to_float32().
DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}

INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor's bytes are: file, absolute offset, size; its dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0


# The safetensors format's own bound on the JSON header (the safetensors library refuses larger ones): without it a
# length field equal to the file size would read the whole checkpoint into memory as "header".
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> list[TensorRef]:
    """The tensors of one safetensors file, in the file's name order, validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _truncated(path, 8, size)
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise EdgeMoEError(
                    f"{path}: the safetensors header claims {n:,} bytes, more than the format's {MAX_HEADER_BYTES:,}",
                    "this is not a safetensors file; download it again",
                )
            if 8 + n > size:
                raise _truncated(path, 8 + n, size)
            raw = f.read(n)
    except OSError as e:
        raise EdgeMoEError(f"cannot read {path}: {e.strerror}", "check the file exists and is readable") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise EdgeMoEError(f"{path} has a malformed safetensors header ({e})", "download the file again") from e
    if not isinstance(header, dict):
        raise EdgeMoEError(f"{path} has a malformed safetensors header (not a JSON object)", "download the file again")
    base = 8 + n
    refs = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        refs.append(_entry(path, name, meta, base, size))
    if not refs:
        raise EdgeMoEError(f"{path} holds no tensors (its header lists none)", "download the file again")
    # data_offsets are where the bytes are: two tensors sharing bytes is a forged or damaged header
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise EdgeMoEError(f"{path}: tensors {first} and {second} overlap in the file", "download the file again")
    # the reference converter (and the safetensors library) iterate a file's tensors in name order
    refs.sort(key=lambda r: r.name)
    return refs


def _entry(path: Path, name: str, meta, base: int, size: int) -> TensorRef:
    """One header entry, every field's type and value checked: the header is data from the file."""

    def bad(what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{path}: tensor {name} {what}", "download the file again")

    if not isinstance(meta, dict):
        raise bad("has a header entry that is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}, not a name")
    if dtype not in DTYPES:
        raise EdgeMoEError(
            f"{path}: tensor {name} has unsupported dtype {dtype}", "convert from a bf16/f16/f32 checkpoint"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative whole numbers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"has data_offsets {offsets!r}, not [start, end] in bytes")
    start, end = offsets
    if end - start != math.prod(shape) * DTYPES[dtype][1]:
        raise bad(f"has inconsistent offsets: {end - start} bytes for shape {shape} of {dtype}")
    if base + end > size:
        raise _truncated(path, base + end, size)
    return TensorRef(name, path, dtype, tuple(shape), base + start, end - start)


def _truncated(path: Path, need: int, have: int) -> EdgeMoEError:
    return EdgeMoEError(
        f"{path} is truncated ({have} bytes, its header needs at least {need})",
        "download the checkpoint again (e.g. `edgemoe pull`)",
    )


def checkpoint_tensors(src: Path) -> list[TensorRef]:
    """All tensors of the checkpoint in `src`, single file or sharded, in the reference converter's order."""
    index = src / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgeMoEError(f"{index} is malformed ({e})", "download the checkpoint's index again") from e
        for tensor, shard in weight_map.items():
            # a shard name from the index is opened as src/NAME: a plain file name in the checkpoint, nothing else
            if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
                raise EdgeMoEError(
                    f"{index}: tensor {tensor} is in shard {shard!r}, not a .safetensors file name "
                    "in the checkpoint directory",
                    "download the checkpoint's index again",
                )
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (src / shard).is_file():
                raise EdgeMoEError(
                    f"shard {src / shard} listed in {index.name} is missing",
                    "download the missing shard (e.g. `edgemoe pull` again)",
                )
        refs = [r for shard in shards for r in read_header(src / shard)]
        seen: dict[str, Path] = {}
        for r in refs:
            if (other := seen.setdefault(r.name, r.file)) != r.file:
                raise EdgeMoEError(
                    f"tensor {r.name} is in two shards, {other.name} and {r.file.name}",
                    "the checkpoint is inconsistent; download it again",
                )
        have = {r.name for r in refs}
        if missing := sorted(set(weight_map) - have):
            raise EdgeMoEError(
                f"{index} lists {len(missing)} tensors not found in its shards (first: {missing[0]})",
                "download the checkpoint again",
            )
        return refs
    single = src / SINGLE_NAME
    if single.is_file():
        return read_header(single)
    raise EdgeMoEError(
        f"no {SINGLE_NAME} or {INDEX_NAME} in {src}",
        "point convert at a Hugging Face checkpoint directory (e.g. one made by `edgemoe pull`)",
    )


class TensorReader:
    """Blocks of rows of checkpoint tensors, as read-only views of one mmap per file.

    Mapping costs no copy: the kernel maps the page cache's pages (64 KiB per fault), where read() would copy
    every byte once more. Mapped pages count in the resident set, so each block is released (MADV_DONTNEED)
    once it has been written: the process then holds only the blocks in flight, however large the checkpoint.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()  # blocks are read from several threads

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            return self._maps.get(path) or self._open(path)

    def _open(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                mm = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_SEQUENTIAL"):  # read ahead: tensors are read front to back
                mm.madvise(mmap.MADV_SEQUENTIAL)
        return self._maps[path]

    def read_rows(self, ref: TensorRef, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `ref`: its stored bits (uint16 for bf16), shaped like the rows, read-only."""
        np_dtype, itemsize = DTYPES[ref.dtype]
        arr = np.frombuffer(
            self._map(ref.file),
            dtype=np_dtype,
            count=(stop - start) * ref.row_nbytes // itemsize,
            offset=ref.offset + start * ref.row_nbytes,
        )
        return arr.reshape((stop - start, *ref.shape[1:])) if ref.shape else arr.reshape(())

    def rows(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of `ref` (the whole tensor by default)."""
        return self.read_rows(ref, start, ref.n_rows if stop is None else stop)

    def release(self, ref: TensorRef, start: int, stop: int) -> None:
        """Drop rows [start, stop)'s pages from the resident set; they stay in the page cache."""
        mm = self._maps.get(ref.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = ref.offset + start * ref.row_nbytes
        begin -= begin % mmap.PAGESIZE
        end = min(ref.offset + stop * ref.row_nbytes, len(mm))
        if end > begin:
            # clean read-only file pages: DONTNEED only unmaps them, a later read maps them again
            mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the map goes when it does
                pass
        self._maps.clear()


def to_float32(bits: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32; bf16 is the upper half of a float32, so widening is a 16-bit shift."""
    if dtype == "BF16":
        if out is None:
            out = np.empty(bits.shape, dtype=np.float32)
        np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    if out is None:
        return bits.astype(np.float32)
    out[...] = bits
    return out
