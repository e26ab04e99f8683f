"""KServe v2 tensors on the wire: typed records, raw bytes, JSON, and the binary tensor data extension.

HTTP body (Triton's binary tensor data extension, what tritonclient sends by default):

    <JSON request of Inference-Header-Content-Length bytes><raw data of input 0><raw data of input 1>...

where each input sent that way has `parameters.binary_data_size`; without the header the body is JSON only.
Raw data is the tensor's row-major bytes, little-endian; BYTES elements are each a 4-byte little-endian length
followed by the data. The response mirrors it for outputs asked for with `binary_data` (or `binary_data_output`).
Nothing here knows the model; `server.v2.service` does.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import InvalidTensor

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype).newbyteorder("<")
    for name, dtype in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
BYTES = "BYTES"
Data = np.ndarray | list[bytes]  # numeric tensors: an array of the tensor's shape; BYTES: the flat elements


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Data


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP only: None = the request's binary_data_output


@dataclass(frozen=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: the model's default outputs
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidTensor(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(shape)


# ------------------------------------------------------------------------------------------------ raw bytes


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> Data:
    """Row-major bytes -> the tensor's data; InvalidTensor if the size does not fit the shape."""
    count = element_count(shape)
    if datatype == BYTES:
        return _bytes_elements(name, raw, count)
    dtype = _numpy_type(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidTensor(
            f"input {name!r}: {len(raw)} bytes of data for {datatype} {list(shape)} "
            f"(needs {count * dtype.itemsize})"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == BYTES:
        assert isinstance(tensor.data, list)
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data)
    assert isinstance(tensor.data, np.ndarray)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def _bytes_elements(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidTensor(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidTensor(f"input {name!r}: a BYTES element of {length} bytes runs past the end of the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidTensor(f"input {name!r}: {len(items)} BYTES elements for a shape of {count} elements")
    return items


def _numpy_type(name: str, datatype: str) -> np.dtype[Any]:
    try:
        return NUMPY_TYPES[datatype]
    except KeyError:
        raise InvalidTensor(f"input {name!r}: unknown datatype {datatype!r}") from None


# ------------------------------------------------------------------------------------------------ JSON values


def from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: object) -> Data:
    """A JSON `data` value (flat or nested, row-major; BYTES as UTF-8 strings) -> the tensor's data."""
    if not isinstance(data, list):
        raise InvalidTensor(f"input {name!r}: data must be a JSON list")
    if datatype != BYTES:
        return from_values(name, datatype, shape, data)
    items = list(_flatten(data))
    if not all(isinstance(item, str) for item in items):
        raise InvalidTensor(f"input {name!r}: BYTES data in JSON must be strings")
    return from_values(name, datatype, shape, [item.encode() for item in items])


def from_values(name: str, datatype: str, shape: tuple[int, ...], values: list[Any]) -> Data:
    """Element values (JSON numbers, gRPC typed contents; BYTES as bytes) -> the tensor's data."""
    count = element_count(shape)
    if datatype == BYTES:
        if len(values) != count:
            raise InvalidTensor(f"input {name!r}: {len(values)} elements for a shape of {count} elements")
        return values
    dtype = _numpy_type(name, datatype)
    try:
        array = np.asarray(values)
    except ValueError:
        raise InvalidTensor(f"input {name!r}: data is not a regular array") from None
    if array.size != count or array.dtype.kind not in "biuf":
        raise InvalidTensor(f"input {name!r}: data must be {count} numbers for {datatype} {list(shape)}")
    converted = array.astype(dtype)
    if dtype.kind != "f" and not np.array_equal(converted, array):  # 300 as UINT8, 1.5 as INT32
        raise InvalidTensor(f"input {name!r}: data values do not fit {datatype}")
    return converted.reshape(shape)


def to_json_data(tensor: Tensor) -> list[Any]:
    if tensor.datatype == BYTES:
        assert isinstance(tensor.data, list)
        return [item.decode(errors="replace") for item in tensor.data]
    assert isinstance(tensor.data, np.ndarray)
    return tensor.data.ravel().tolist()


def _flatten(data: Iterable[object]) -> Iterable[object]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


# ------------------------------------------------------------------------------------------------ HTTP bodies


def parse_http_request(body: bytes, header_length: str | None) -> InferRequest:
    """An HTTP infer body (JSON, or JSON + binary input data) -> InferRequest; InvalidTensor when malformed."""
    json_end = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidTensor(
                f"{HEADER_LENGTH} is {header_length!r}; it must be a byte count within the body ({len(body)} bytes)"
            )
        json_end = int(header_length)
    try:
        request = json.loads(body[:json_end])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidTensor(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidTensor("the inference request must be a JSON object with an 'inputs' list")
    binary = memoryview(body)[json_end:]
    inputs: list[Tensor] = []
    offset = 0
    for entry in request["inputs"]:
        tensor, used = _http_input(entry, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise InvalidTensor(f"{len(binary) - offset} bytes of binary data after the last input's")
    return InferRequest(
        inputs=inputs,
        outputs=[_http_output(entry) for entry in _list(request.get("outputs", []), "outputs")],
        parameters=_dict(request.get("parameters", {}), "parameters"),
        id=str(request.get("id", "")),
    )


def _http_input(entry: object, binary: memoryview) -> tuple[Tensor, int]:
    """One JSON input entry -> its tensor, and how many bytes of the binary section it used."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
        entry.get("datatype"), str
    ):
        raise InvalidTensor("each input needs a 'name', a 'datatype' and a 'shape'")
    name, datatype = entry["name"], entry["datatype"]
    shape = check_shape(name, entry.get("shape"))
    size = _dict(entry.get("parameters", {}), f"input {name!r} parameters").get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise InvalidTensor(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        return Tensor(name, datatype, shape, from_json_data(name, datatype, shape, entry["data"])), 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(binary):
        raise InvalidTensor(
            f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} bytes of binary data left"
        )
    return Tensor(name, datatype, shape, from_raw(name, datatype, shape, binary[:size])), size


def _http_output(entry: object) -> RequestedOutput:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidTensor("each requested output needs a 'name'")
    binary = _dict(entry.get("parameters", {}), "output parameters").get("binary_data")
    return RequestedOutput(entry["name"], binary if isinstance(binary, bool) else None)


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidTensor(f"{what} must be a JSON object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidTensor(f"{what} must be a JSON list")
    return value


def http_response(
    header: dict[str, Any], outputs: list[Tensor], binary: set[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers: JSON, with the outputs named in `binary` appended as raw data."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.name in binary:
            raw = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json_data(tensor)
        entries.append(entry)
    text = json.dumps({**header, "outputs": entries}, separators=(",", ":")).encode()
    if not chunks:
        return text, {"content-type": "application/json"}
    return b"".join([text, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(text))}
