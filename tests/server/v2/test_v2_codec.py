"""KServe v2 tensors on the wire (server.v2.codec) and the gRPC message conversion (server.v2.grpc)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server.errors import InvalidTensor
from server.v2 import codec
from server.v2 import grpc_predict_v2_pb2 as pb
from server.v2.grpc import infer_request


def body(request: dict[str, object], *chunks: bytes) -> tuple[bytes, str]:
    text = json.dumps(request).encode()
    return text + b"".join(chunks), str(len(text))


def test_numeric_tensors_round_trip_through_raw_bytes() -> None:
    for datatype, dtype in (("UINT8", np.uint8), ("INT32", np.int32), ("FP32", np.float32), ("INT64", np.int64)):
        array = (np.arange(24) * 3).astype(dtype).reshape(2, 3, 4)
        tensor = codec.Tensor("t", datatype, (2, 3, 4), array)
        back = codec.from_raw("t", datatype, (2, 3, 4), codec.to_raw(tensor))
        assert isinstance(back, np.ndarray) and back.dtype == dtype and np.array_equal(back, array)
    assert codec.to_raw(codec.Tensor("t", "INT32", (1,), np.array([1], np.int32))) == b"\x01\x00\x00\x00"  # LE


def test_bytes_elements_are_length_prefixed() -> None:
    tensor = codec.Tensor("t", "BYTES", (2,), [b"ab", b""])
    raw = codec.to_raw(tensor)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert codec.from_raw("t", "BYTES", (2,), raw) == [b"ab", b""]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "match"),
    [
        ("UINT8", (2, 2), b"\x00" * 3, "3 bytes of data for UINT8 [2, 2] (needs 4)"),
        ("BYTES", (2,), struct.pack("<I", 1) + b"a", "1 BYTES elements for a shape of 2"),
        ("BYTES", (1,), struct.pack("<I", 9) + b"a", "runs past the end"),
        ("BYTES", (1,), b"\x01\x00", "inside an element's 4-byte length"),
        ("COMPLEX", (1,), b"\x00", "unknown datatype 'COMPLEX'"),
    ],
)
def test_raw_data_that_does_not_fit_is_refused(datatype: str, shape: tuple[int, ...], raw: bytes, match: str) -> None:
    with pytest.raises(InvalidTensor, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        codec.from_raw("t", datatype, shape, raw)


def test_a_binary_request_splits_json_and_data() -> None:
    pixels = np.arange(12, dtype=np.uint8)
    data, length = body(
        {
            "id": "r1",
            "inputs": [
                {"name": "a", "datatype": "UINT8", "shape": [1, 12], "parameters": {"binary_data_size": 12}},
                {"name": "b", "datatype": "INT32", "shape": [2], "data": [[5], [6]]},
            ],
            "outputs": [{"name": "x", "parameters": {"binary_data": False}}, {"name": "y"}],
            "parameters": {"score_threshold": 0.5},
        },
        pixels.tobytes(),
    )
    request = codec.parse_http_request(data, length)
    a, b = request.inputs
    assert (a.name, a.shape) == ("a", (1, 12)) and np.array_equal(a.data, pixels.reshape(1, 12))
    assert (b.name, b.shape) == ("b", (2,)) and np.array_equal(b.data, [5, 6])
    assert request.outputs == [codec.RequestedOutput("x", False), codec.RequestedOutput("y", None)]
    assert (request.parameters, request.id) == ({"score_threshold": 0.5}, "r1")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"name": "a", "datatype": "UINT8", "shape": [2], "data": [1, 300]}, "do not fit UINT8"),
        ({"name": "a", "datatype": "INT32", "shape": [2], "data": [1.5, 2]}, "do not fit INT32"),
        ({"name": "a", "datatype": "UINT8", "shape": [3], "data": [1, 2]}, "must be 3 numbers"),
        ({"name": "a", "datatype": "UINT8", "shape": [2], "data": [[1], [2, 3]]}, "not a regular array"),
        ({"name": "a", "datatype": "BYTES", "shape": [1], "data": [7]}, "must be strings"),
        ({"name": "a", "datatype": "UINT8", "shape": [-1], "data": []}, "negative dimension"),
        ({"name": "a", "datatype": "UINT8", "shape": "2", "data": [1, 2]}, "list of integers"),
        ({"name": "a", "datatype": "UINT8", "shape": [2]}, "neither 'data' nor"),
        ({"name": "a", "shape": [2]}, "needs a 'name', a 'datatype'"),
    ],
)
def test_json_inputs_that_do_not_fit_are_refused(entry: dict[str, object], match: str) -> None:
    data, length = body({"inputs": [entry]})
    with pytest.raises(InvalidTensor, match=match):
        codec.parse_http_request(data, length)


def test_json_bytes_are_utf8_strings() -> None:
    data, _ = body({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1, 2], "data": [["é", "b"]]}]})
    (tensor,) = codec.parse_http_request(data, None).inputs
    assert tensor.data == ["é".encode(), b"b"]


def test_a_response_puts_binary_outputs_after_the_json() -> None:
    outputs = [
        codec.Tensor("n", "INT32", (2,), np.array([1, 0], np.int32)),
        codec.Tensor("labels", "BYTES", (2, 1), [b"cat", b""]),
    ]
    data, headers = codec.http_response({"model_name": "m"}, outputs, binary={"n"})
    length = int(headers[codec.HEADER_LENGTH])
    header = json.loads(data[:length])
    assert header["outputs"][0] == {"name": "n", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}}
    assert header["outputs"][1]["data"] == ["cat", ""]
    assert data[length:] == np.array([1, 0], "<i4").tobytes()
    data, headers = codec.http_response({"model_name": "m"}, outputs, binary=set())
    assert headers == {"content-type": "application/json"} and json.loads(data)["outputs"][0]["data"] == [1, 0]


def test_grpc_requests_take_raw_or_typed_contents() -> None:
    message = pb.ModelInferRequest(model_name="m", id="7")
    message.inputs.add(name="images", datatype="UINT8", shape=[1, 2])
    message.raw_input_contents.append(bytes([3, 4]))
    message.parameters["score_threshold"].double_param = 0.25
    message.parameters["max_detections"].int64_param = 5
    message.outputs.add(name="boxes")
    request = infer_request(message)
    assert np.array_equal(request.inputs[0].data, [[3, 4]]) and request.inputs[0].data.dtype == np.uint8
    assert request.parameters == {"score_threshold": 0.25, "max_detections": 5}
    assert [o.name for o in request.outputs] == ["boxes"] and request.id == "7"

    typed = pb.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a", b"bc"])
    assert infer_request(typed).inputs[0].data == [b"a", b"bc"]

    wrong = pb.ModelInferRequest(model_name="m")
    wrong.inputs.add(name="a", datatype="UINT8", shape=[1])
    wrong.inputs.add(name="b", datatype="UINT8", shape=[1])
    wrong.raw_input_contents.append(b"\x00")
    with pytest.raises(InvalidTensor, match="1 raw_input_contents for 2 inputs"):
        infer_request(wrong)
