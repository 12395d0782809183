"""Stream planned tensors into a GGUF file: header, keys and tensor infos first, then each tensor's data.

GGUFWriter writes the header, the key/values and the tensor infos (declared up front with their final shapes,
types and byte sizes). The data section is then written here, piece by piece: a stacked expert tensor
[n_expert, rows, cols] is just its experts' bytes one after another, so each expert is converted (or quantized)
and written on its own and the stack never exists in memory. Large pieces go in blocks of rows, so memory stays
near one block whatever the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .arch import PlannedTensor
from .safetensors import TensorReader, to_float32

Q = gguf.GGMLQuantizationType

# Rows are converted in blocks of about this many source bytes: big enough for fast sequential writes and
# vectorised numpy, small enough that peak memory stays a few blocks.
BLOCK_BYTES = 32 << 20

Progress = Callable[[int, int, int, int, str], None]  # (bytes done, bytes total, tensors done, tensors total, name)


def encode(bits: np.ndarray, src_dtype: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Stored checkpoint values -> the bytes of `qtype`, exactly as llama.cpp's converter computes them.

    llama.cpp widens anything that is not f16/f32 (bf16) to f32 and then casts or quantizes with gguf.quants;
    the bf16 fast paths below give the same bits without the detour.
    """
    if src_dtype == "BF16":
        if qtype == Q.BF16:
            # f32 from bf16 has zero low bits, so round-to-nearest-even is the identity; only NaNs change
            # (ggml forces them quiet)
            nan = (bits & 0x7FFF) > 0x7F80
            return np.where(nan, bits | 0x0040, bits) if nan.any() else bits
        values = to_float32(bits, src_dtype)
    elif src_dtype in ("F32", "F16"):
        values = bits
    else:
        values = bits.astype(np.float32)
    if qtype == Q.F32:
        return values.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return values.astype(np.float16, copy=False)
    return gguf.quants.quantize(values, qtype)


def write_gguf(writer: gguf.GGUFWriter, path: Path, plan: list[PlannedTensor], reader: TensorReader,
               progress: Progress | None = None) -> None:
    """Write the file: `writer` already holds the keys and every planned tensor's info, in plan order."""
    total = sum(t.nbytes for t in plan)
    done = 0
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    for i, tensor in enumerate(plan):
        start = fout.tell()
        for piece in tensor.pieces:
            row_bytes = max(piece.ref.row_nbytes, 1)
            step = max(1, BLOCK_BYTES // row_bytes)
            for a in range(piece.start, piece.stop, step):
                b = min(a + step, piece.stop)
                data = encode(reader.rows(piece.ref, a, b),
                              piece.ref.dtype, tensor.qtype)
                fout.write(np.ascontiguousarray(data).data)
                done += data.nbytes
                if progress is not None:
                    progress(done, total, i, len(plan), tensor.name)
            reader.release(piece.ref)
        written = fout.tell() - start
        if written != tensor.nbytes:  # a mismatch here would only surface as a corrupt file at load time
            raise RuntimeError(f"tensor {tensor.name} wrote {written} bytes, expected {tensor.nbytes}")
        writer.write_padding(fout, written)
        if progress is not None:
            progress(done, total, i + 1, len(plan), tensor.name)
    writer.close()
