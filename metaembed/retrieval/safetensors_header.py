"""Reading a safetensors file's header by hand: where each tensor's bytes lie, so that they can be memory-mapped
or streamed without loading the file. The one reader for the index's tensors and the sharded encoder's chunks."""

import json
import struct
from pathlib import Path


def read_header(path, error=ValueError) -> tuple:
    """(header dict, absolute offset of the data, file size) of the safetensors file `path`. A truncated file or an
    unreadable header raises `error` naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise error(f"{path} is truncated (no safetensors header)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise error(f"{path} is truncated (header of {header_length} bytes in a {size}-byte file)")
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as caught:
            raise error(f"{path} has an unreadable safetensors header: {caught}") from caught
    if not isinstance(header, dict):
        raise error(f"{path} has an unreadable safetensors header: not a JSON object")
    return header, 8 + header_length, size


def tensor_span(header: dict, data_start: int, name: str, path, error=ValueError) -> tuple:
    """(dtype string, shape, absolute byte offset, byte count) of tensor `name`."""
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise error(f"{path} holds no {name!r} tensor")
    begin, end = entry["data_offsets"]
    return entry["dtype"], entry["shape"], data_start + begin, end - begin


__all__ = ["read_header", "tensor_span"]
