"""serve against hostile requests, over a real uvicorn on 127.0.0.1 (the model is a stand-in;
tests/integration/test_release.py serves a real release)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn

from pipeline.release.serving import ACCESS_LOG, body_limit, card_input_range, create_app
from tests.conftest import free_port


class TinyModel:
    """Stands in for a Keras model: 2x2x1 inputs, 3 classes, probabilities from the sum."""

    input_shape = (None, 2, 2, 1)

    def predict(self, x: np.ndarray, verbose: int = 0) -> np.ndarray:
        s = x.reshape(len(x), -1).sum(axis=1)
        logits = np.stack([s, 1 - s, np.zeros_like(s)], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


META = {"release": "r", "model": "package/model.keras", "model_sha256": "ab" * 32, "verified": True}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, list[str]]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(ACCESS_LOG + ".test")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    app = create_app(TinyModel(), META, input_range=(0.0, 1.0), max_body_bytes=4096, logger=logger)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield port, lines
    srv.should_exit = True
    thread.join(10)


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/predict",
        body=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data or b"null")


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_a_valid_batch_predicts(server):
    port, _ = server
    status, body = post(port, b'{"instances": [[[[0.1], [0.2]], [[0.0], [0.3]]]]}')
    assert status == 200
    assert len(body["predictions"]) == 1 and body["classes"] == [0]
    status, body = post(port, b'{"instances": [[0, 0, 0, 1], [0, 0, 0, 0.2]]}')  # flattened
    assert status == 200 and body["classes"] == [0, 1]


@pytest.mark.parametrize(
    "values",
    ["NaN", "Infinity", "-Infinity", "1e38", "1e39", "16", "-0.5", '"0.5"', "true"],
)
def test_non_finite_out_of_range_or_non_numeric_values_are_422(server, values):
    port, _ = server
    status, body = post(port, f'{{"instances": [[0.1, 0.2, 0.3, {values}]]}}'.encode())
    assert status == 422, body


def test_errors_do_not_echo_the_input(server):
    port, _ = server
    secret = "0.123456789"
    for payload in (
        f'{{"instances": [[{secret}, NaN, 0, 0]]}}',
        f'{{"instances": [[{secret}, 7, 0, 0]]}}',
        f'{{"instances": [[{secret}, 0, 0]]}}',
        f'{{"instances": [[{secret}, "x", 0, 0]]}}',
        f'{{"instances": [[{secret}, 0, 0, 0], [{secret}]]}}',
        f'{{"instances": [[{secret},',
    ):
        status, body = post(port, payload.encode())
        assert status == 422, payload
        assert secret not in json.dumps(body) and '"input":' not in json.dumps(body), body


def test_range_error_says_what_to_do(server):
    port, _ = server
    status, body = post(port, b'{"instances": [[16, 0, 3, 1]]}')
    assert status == 422
    assert "2 of 4 value(s) lie outside [0, 1]" in body["detail"]


def test_a_too_large_body_is_413_before_it_is_read(server):
    port, _ = server
    big = b'{"instances": [' + b"[0.1, 0.2, 0.3, 0.4]," * 400 + b"[0, 0, 0, 0]]}"
    status, body = post(port, big)
    assert status == 413 and "larger than 4096 bytes" in body["detail"]
    # a Content-Length claim alone is refused, without waiting for (or reading) any body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(108 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_a_chunked_body_over_the_limit_is_413(server):
    """No Content-Length: the server counts while reading, and answers 413 at the limit
    (the client stops after the chunk that passes it and still gets the answer)."""
    port, _ = server
    chunk = b'{"instances": [' + b"[0.1, 0.2, 0.3, 0.4]," * 250
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        )
        reply = b""
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]


def test_openapi_is_typed_and_docs_are_off(server):
    port, _ = server
    status, raw = get(port, "/openapi.json")
    assert status == 200
    spec = json.loads(raw)
    predict = spec["paths"]["/predict"]["post"]
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PredictResponse"}
    assert {"413", "422"} <= set(predict["responses"])
    instances = spec["components"]["schemas"]["PredictRequest"]["properties"]["instances"]
    assert instances["maxItems"] == 1024 and "anyOf" in instances["items"]
    assert get(port, "/docs")[0] == 404 and get(port, "/redoc")[0] == 404
    status, raw = get(port, "/metadata")
    assert json.loads(raw)["input"] == {"shape": [2, 2, 1], "dtype": "float32", "range": [0.0, 1.0]}


def test_every_request_is_in_the_access_log_without_its_data(server):
    port, lines = server
    before = len(lines)
    post(port, b'{"instances": [[0.987654, 0, 0, 0]]}')
    get(port, "/health?token=abc")
    # The access line is written after the response is sent: give the server thread a moment.
    deadline = time.monotonic() + 10
    while len(lines) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    new = lines[before:]
    assert any('"POST /predict" 200' in line for line in new)
    assert any('"GET /health" 200' in line for line in new)
    assert not any("0.987654" in line or "abc" in line for line in new)


def test_input_range_comes_from_the_model_card(tmp_path):
    card = tmp_path / "artifacts" / "package" / "model_card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"input": {"range": [0.0, 1.0]}}))
    assert card_input_range(tmp_path) == (0.0, 1.0)
    for bad in ([1.0, 0.0], ["a", 1], [0, float("inf")], None):
        card.write_text(json.dumps({"input": {"range": bad}}))
        assert card_input_range(tmp_path) is None
    card.write_text("[]")
    assert card_input_range(tmp_path) is None


def test_the_default_limit_fits_a_full_batch():
    assert body_limit((8, 8, 1)) > 1024 * 64 * len("0.123456789, ")
