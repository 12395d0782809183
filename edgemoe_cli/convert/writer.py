"""Stream planned tensors into a GGUF file: header, keys and tensor infos first, then each tensor's data.

GGUFWriter writes the header, the key/values and the tensor infos (declared up front with their final shapes,
types and byte sizes). The data section is then written here, piece by piece: a stacked expert tensor
[n_expert, rows, cols] is just its experts' bytes one after another, so each expert is converted (or quantized)
and written on its own and the stack never exists in memory. Large pieces go in blocks of rows, so memory stays
near one block whatever the tensor.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGUFValueType

from .arch import PlannedTensor
from .safetensors import TensorReader, to_float32

Q = gguf.GGMLQuantizationType

# Rows are converted in blocks of about this many source bytes: big enough for fast sequential I/O and vectorised
# numpy, small enough that the buffers of the few blocks in flight are all the memory the data needs.
BLOCK_BYTES = 4 << 20
# Threads converting blocks while one more writes them (numpy and write() release the GIL).
ENCODE_THREADS = 2

Progress = Callable[[int, int, int, int, str], None]  # (bytes done, bytes total, tensors done, tensors total, name)


class StreamingGGUFWriter(gguf.GGUFWriter):
    """GGUFWriter that packs long arrays (the vocabulary: tokens, scores, types) in bulk, same bytes.

    The stock writer packs each item through its generic path, which takes seconds for a 100k-token vocabulary.
    """

    _BULK = {float: ("<f4", GGUFValueType.FLOAT32), int: ("<i4", GGUFValueType.INT32)}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (
            vtype != GGUFValueType.ARRAY
            or sub_type is not None
            or self.endianess != gguf.GGUFEndian.LITTLE
            or not isinstance(val, (list, tuple))
            or len(val) < 256
        ):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        kind = type(val[0])
        if kind not in (float, int, str, bytes) or any(type(v) is not kind for v in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        if kind in self._BULK:
            fmt, ltype = self._BULK[kind]
            body = np.asarray(val, dtype=fmt).tobytes()
        else:
            ltype = GGUFValueType.STRING
            items = [v.encode("utf-8") for v in val] if kind is str else val
            body = b"".join(struct.pack("<Q", len(v)) + v for v in items)
        head = struct.pack("<I", vtype) if add_vtype else b""
        return head + struct.pack("<IQ", ltype, len(val)) + body


class Scratch:
    """Reusable buffers, so converting a block allocates (and page-faults) nothing new."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._bufs[key] = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


def encode(
    bits: np.ndarray, src_dtype: str, qtype: gguf.GGMLQuantizationType, scratch: Scratch | None = None
) -> np.ndarray:
    """Stored checkpoint values -> the bytes of `qtype`, exactly as llama.cpp's converter computes them.

    llama.cpp widens anything that is not f16/f32 (bf16) to f32 and then casts or quantizes with gguf.quants;
    the bf16 fast paths below give the same bits without the detour and into reused buffers.
    """
    scratch = scratch or Scratch()
    if src_dtype == "BF16":
        if qtype == Q.BF16:
            # f32 from bf16 has zero low bits, so round-to-nearest-even is the identity; only NaNs change
            # (ggml forces them quiet). NaN bits are 0x7F81..0x7FFF (the largest int16 values) or 0xFF81..0xFFFF
            # (the largest uint16 values): two max reductions find them without a temporary array.
            if bits.size and (bits.view(np.int16).max() > 0x7F80 or bits.max() > 0xFF80):
                return np.where((bits & 0x7FFF) > 0x7F80, bits | 0x0040, bits)
            return bits
        if qtype == Q.F16:
            return _bf16_to_f16(bits, scratch)
        values = to_float32(bits, src_dtype, out=scratch.get("f32", bits.shape, np.float32))
    elif src_dtype in ("F32", "F16"):
        values = bits
    else:
        values = bits.astype(np.float32)
    if qtype == Q.F32:
        return values.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return values.astype(np.float16, copy=False)
    return gguf.quants.quantize(values, qtype)


def _bf16_to_f16(bits: np.ndarray, scratch: Scratch) -> np.ndarray:
    """bf16 bits -> f16 bits, the same as numpy's float32 -> float16 cast of the widened values, ~3x faster.

    A bf16 with exponent 113..142 is a normal f16 exactly (7 mantissa bits fit in 10): rebias the exponent by
    127 - 15 and shift. The rest (f16 subnormals and zero, overflow to inf, inf, NaN; ~0.2% of real weights)
    goes through numpy's cast, one element at a time.
    """
    magnitude = np.bitwise_and(bits, 0x7FFF, out=scratch.get("mag", bits.shape, np.uint16))
    out = np.subtract(magnitude, (127 - 15) << 7, out=scratch.get("f16", bits.shape, np.uint16))
    np.left_shift(out, 3, out=out)
    sign = np.bitwise_and(bits, 0x8000, out=scratch.get("sign", bits.shape, np.uint16))
    np.bitwise_or(out, sign, out=out)
    # exponent outside 113..142 is magnitude outside [0x3880, 0x477F]: one unsigned compare, as below wraps around
    offset = np.subtract(magnitude, 0x3880, out=sign)
    if (rare := np.flatnonzero(offset > 0x477F - 0x3880)).size:
        wide = (bits.reshape(-1)[rare].astype(np.uint32) << 16).view(np.float32)
        with np.errstate(over="ignore"):
            out.reshape(-1)[rare] = wide.astype(np.float16).view(np.uint16)
    return out.view(np.float16)


def write_gguf(
    writer: gguf.GGUFWriter,
    path: Path,
    plan: list[PlannedTensor],
    reader: TensorReader,
    progress: Progress | None = None,
) -> None:
    """Write the file: `writer` already holds the keys and every planned tensor's info, in plan order.

    Blocks are converted on ENCODE_THREADS threads (numpy releases the GIL) and written in order by one writer
    thread, so conversion, the page-cache copy and the disk's write-back overlap instead of adding up. Each
    block in flight has its own set of buffers; a set is reused only once its block has been written.
    """
    total = sum(t.nbytes for t in plan)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    fout.flush()
    written = [0] * len(plan)
    done = 0

    def write_block(i: int, encoded, piece, a: int, b: int) -> None:
        nonlocal done
        data = encoded.result()
        fout.write(data.data)
        # only now: a bf16 -> bf16 block is written straight from the mapped pages
        reader.release(piece.ref, a, b)
        written[i] += data.nbytes
        done += data.nbytes
        if progress is not None:
            progress(done, total, i, len(plan), plan[i].name)

    def finish_tensor(i: int) -> None:
        if written[i] != plan[i].nbytes:  # a mismatch here would only surface as a corrupt file at load time
            raise RuntimeError(f"tensor {plan[i].name} gave {written[i]} bytes, expected {plan[i].nbytes}")
        writer.write_padding(fout, written[i])
        if progress is not None:
            progress(done, total, i + 1, len(plan), plan[i].name)

    n_slots = ENCODE_THREADS + 2
    scratches, slot_writes, finished = [Scratch() for _ in range(n_slots)], [None] * n_slots, []
    with ThreadPoolExecutor(ENCODE_THREADS, "gguf-encode") as encoders, ThreadPoolExecutor(1, "gguf-write") as out:
        slot = 0
        for i, tensor in enumerate(plan):
            for piece in tensor.pieces:
                step = max(1, BLOCK_BYTES // max(piece.ref.row_nbytes, 1))
                for a in range(piece.start, piece.stop, step):
                    b = min(a + step, piece.stop)
                    if slot_writes[slot] is not None:  # this slot's buffers are free once its block is written
                        slot_writes[slot].result()
                    encoded = encoders.submit(_encode_block, reader, piece.ref, a, b, tensor.qtype, scratches[slot])
                    slot_writes[slot] = out.submit(write_block, i, encoded, piece, a, b)
                    slot = (slot + 1) % n_slots
            finished.append(out.submit(finish_tensor, i))
        for future in [*slot_writes, *finished]:
            if future is not None:
                future.result()
    writer.close()


def _encode_block(reader: TensorReader, ref, a: int, b: int, qtype, scratch: Scratch) -> np.ndarray:
    return np.ascontiguousarray(encode(reader.read_rows(ref, a, b), ref.dtype, qtype, scratch))
