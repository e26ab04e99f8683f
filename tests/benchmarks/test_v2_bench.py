"""benchmarks.v2_bench: its v2 request body is one the server parses, and its arguments are checked."""

from __future__ import annotations

from benchmarks.v2_bench import main, v2_body
from server.v2 import codec


def test_the_v2_body_is_the_binary_extension_the_server_parses() -> None:
    body, headers = v2_body([b"first", b"second!"])
    request = codec.parse_http_request(body, headers[codec.HEADER_LENGTH])
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape, tensor.data) == ("image", "BYTES", (2,), [b"first", b"second!"])
    assert request.parameters == {"binary_data_output": True}


def test_bad_arguments_are_refused_before_anything_starts() -> None:
    assert main(["--front-ends", "detect,smoke-signals"]) == 2
    assert main(["--concurrency", "0"]) == 2
