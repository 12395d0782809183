"""Write a GGUF whose tensors are raw bytes taken from GGUFs already on disk, tensor by tensor.

`prune` (experts sliced out of stacked tensors) and `plan` (a calibration model assembled from whole-model
quantizations: one role from the Q3_K file, the rest from the reference) both need it. The source files are read
through GGUFReader's memory maps and each tensor is written straight from them, so nothing larger than one tensor
is ever held in memory and the bytes land unchanged (quantized blocks are never decoded).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgeMoEError
from .store import atomic_output


@dataclass
class OutTensor:
    """One tensor of the output: `source` (a GGUFReader tensor) gives its name and ggml type; `data()` its bytes,
    by default the source's own, read only when the tensor is written."""

    source: object
    shape: tuple[int, ...] | None = None  # numpy shape of data(); None: the source's
    nbytes: int | None = None
    data: Callable[[], np.ndarray] | None = None

    def array(self) -> np.ndarray:
        return self.data() if self.data is not None else self.source.data


def write_gguf(
    reader,
    out: str | Path,
    tensors: list[OutTensor],
    values: dict[str, object] | None = None,
    progress: Callable[[int, int], None] | None = None,
    added: list[tuple[str, object, object]] | None = None,
) -> None:
    """Copy every key of `reader` (with `values` replacing some, their GGUF types kept), add the `added` keys
    (key, value, GGUFValueType), and write `tensors`, in order, to `out` (atomically). All tensors must share
    `reader`'s byte order."""
    import gguf

    values = values or {}
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(path=None, arch=arch)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, values[f.name] if f.name in values else f.contents(), vtype, sub_type=sub)
    for key, value, vtype in added or []:
        writer.add_key_value(key, value, vtype)
    for t in tensors:
        src = t.source
        shape = list(t.shape if t.shape is not None else src.data.shape)
        nbytes = int(t.nbytes if t.nbytes is not None else src.n_bytes)
        writer.add_tensor_info(src.name, shape, src.data.dtype, nbytes, raw_dtype=src.tensor_type)
    total = sum(ti.nbytes for ti in writer.tensors[0].values())
    try:
        with atomic_output(out) as part:
            writer.write_header_to_file(path=part)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for t in tensors:
                arr = t.array()
                writer.write_tensor_data(arr, tensor_endianess=reader.endianess)
                done += arr.nbytes
                if progress is not None:
                    progress(done, total)
            writer.close()
    except OSError as e:  # ENOSPC, EDQUOT, EIO while writing: the partial file is gone, the output untouched
        with contextlib.suppress(OSError):
            writer.close()
        # numpy's tofile reports a short write ("N requested and M written") without an errno: a full disk too
        reason = os.strerror(e.errno) if e.errno else f"the disk took only part of a write ({e})"
        raise EdgeMoEError(
            f"cannot write {out}: {reason}", f"free {total:,} bytes or more on its disk, or write elsewhere with --out"
        ) from e
