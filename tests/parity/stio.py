"""Minimal safetensors reader/writer (json + struct + numpy, no external package).

File layout (https://github.com/huggingface/safetensors, "Format"):
    u64 little-endian N | N bytes of JSON header | data bytes
The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the start of the data section) plus an optional
"__metadata__" object of string -> string. We pad the header with spaces so the
data section starts at a multiple of 8, and lay tensors out contiguously in
insertion order.

    save(path, {name: tensor}, metadata=None)   tensors: torch.Tensor or numpy array
    load(path) -> {name: torch.Tensor}           (header order)
    load_metadata(path) -> {str: str}
"""
import json
import struct

import numpy as np
import torch

# safetensors dtype name -> (numpy little-endian dtype used for the bytes, torch dtype).
# BF16 has no numpy dtype: its bytes travel as int16 and are reinterpreted.
DTYPES = {
    "F64": ("<f8", torch.float64),
    "F32": ("<f4", torch.float32),
    "F16": ("<f2", torch.float16),
    "BF16": ("<i2", torch.bfloat16),
    "I64": ("<i8", torch.int64),
    "I32": ("<i4", torch.int32),
    "I16": ("<i2", torch.int16),
    "I8": ("i1", torch.int8),
    "U8": ("u1", torch.uint8),
    "BOOL": ("?", torch.bool),
}
_TORCH_TO_NAME = {tdt: name for name, (_, tdt) in DTYPES.items()}
_NUMPY_TO_NAME = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


def _to_bytes(t):
    """(dtype name, shape list, raw little-endian bytes) of a torch tensor or numpy array."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        if t.dtype not in _TORCH_TO_NAME:
            raise TypeError(f"unsupported torch dtype {t.dtype}")
        name = _TORCH_TO_NAME[t.dtype]
        shape = list(t.shape)
        # bfloat16 has no numpy twin: reinterpret its 2-byte words as int16.
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    else:
        arr = np.asarray(t)
        if arr.dtype not in _NUMPY_TO_NAME:
            raise TypeError(f"unsupported numpy dtype {arr.dtype}")
        name = _NUMPY_TO_NAME[arr.dtype]
        shape = list(arr.shape)
    return name, shape, np.ascontiguousarray(arr, dtype=DTYPES[name][0]).tobytes()


def save(path, tensors, metadata=None):
    """Write `tensors` (dict name -> tensor) to `path` as safetensors."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved")
        dtype, shape, raw = _to_bytes(t)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-(8 + len(hjson))) % 8)  # data section starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in blobs:
            f.write(raw)


def _read_header(buf, path):
    if len(buf) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError(f"{path}: header length {n} exceeds file size {len(buf)}")
    return json.loads(buf[8:8 + n].decode("utf-8")), 8 + n


def load_metadata(path):
    with open(path, "rb") as f:
        buf = f.read()
    header, _ = _read_header(buf, path)
    return dict(header.get("__metadata__", {}))


def load(path):
    """Read a safetensors file into a dict name -> torch.Tensor (header order)."""
    with open(path, "rb") as f:
        buf = f.read()
    header, start = _read_header(buf, path)
    data_len = len(buf) - start
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info["dtype"], info["shape"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        np_dt = DTYPES[dtype][0]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= begin <= end <= data_len) or end - begin != numel * np.dtype(np_dt).itemsize:
            raise ValueError(f"{path}: tensor '{name}' offsets {begin}..{end} do not fit "
                             f"shape {shape} {dtype} in {data_len} data bytes")
        arr = np.frombuffer(buf, dtype=np_dt, count=numel, offset=start + begin).reshape(shape)
        # copy into native byte order (torch wants a writable, native array)
        t = torch.from_numpy(arr.astype(np.dtype(np_dt).newbyteorder("="), copy=True))
        out[name] = t.view(torch.bfloat16) if dtype == "BF16" else t
    return out
