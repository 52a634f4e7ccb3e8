"""Embeddings on the wire between the `metaembed` request plugin and its clients (no vLLM import: both sides use it).

    encoding "float":  [[[float] * D] * k] * N                      (JSON lists, float32 values)
    encoding "base64": {"dtype": "float32" | "float16" | "bfloat16", "shape": [N, k, D],
                        "base64": <the N*k*D values, little-endian, row-major>}

bfloat16 travels as its raw 16 bits (the upper half of the float32), so any reader can widen it by a shift.
"""

import base64

import numpy as np
import torch

ENCODINGS = ("float", "base64")
WIRE_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}  # numpy layout of each dtype's bytes


def check_format(encoding, dtype) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: expected one of {list(ENCODINGS)}")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(WIRE_DTYPES)}")
    if encoding == "float" and dtype != "float32":
        raise ValueError(f"dtype={dtype!r} needs encoding 'base64' (JSON floats are float32)")


def encode_tensor(tensor: torch.Tensor, encoding: str = "float", dtype: str = "float32"):
    """(N, k, D) float tensor -> the JSON-able payload above."""
    check_format(encoding, dtype)
    tensor = tensor.detach().float().cpu().contiguous()
    if encoding == "float":
        return tensor.tolist()
    if dtype == "bfloat16":
        array = tensor.to(torch.bfloat16).view(torch.int16).numpy().astype("<u2")
    else:
        array = tensor.numpy().astype(WIRE_DTYPES[dtype])
    return {"dtype": dtype, "shape": list(tensor.shape), "base64": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_tensor(payload) -> torch.Tensor:
    """The payload above -> a float32 tensor of its shape."""
    if isinstance(payload, list):
        return torch.tensor(payload, dtype=torch.float32)
    dtype, shape = payload.get("dtype"), payload.get("shape")
    if dtype not in WIRE_DTYPES or not isinstance(shape, list):
        raise ValueError(f"not an embeddings payload: dtype={dtype!r}, shape={shape!r}")
    array = np.frombuffer(base64.b64decode(payload["base64"]), dtype=WIRE_DTYPES[dtype])
    if array.size != int(np.prod(shape)):
        raise ValueError(f"the payload holds {array.size} values, its shape {shape} says {int(np.prod(shape))}")
    if dtype == "bfloat16":
        array = (array.astype("<u4") << 16).view("<f4")
    return torch.from_numpy(array.astype(np.float32)).reshape(shape)


__all__ = ["ENCODINGS", "WIRE_DTYPES", "check_format", "encode_tensor", "decode_tensor"]
