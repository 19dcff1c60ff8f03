"""The server under hostile clients: per-request caps, malformed input, wrong methods, bursts,
clients that leave, slow image hosts. Every answer is a status with an OpenAI error object,
and the server keeps answering."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer
from serving import assert_error, call, chat, data_url, picture, request, serve

from mlx_smolvlm import load

pytest.importorskip("transformers")
pytest.importorskip("torch")

MAX_IMAGES = 2
MAX_PROMPT_TOKENS = 300
MAX_IMAGE_PIXELS = 100_000
MAX_TOTAL_PIXELS = 150_000
MAX_PENDING = 6
FETCH_TIMEOUT = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import real_model_dir

    path = tmp_path_factory.mktemp("tiny-limits")
    shared = real_model_dir("SmolVLM-256M-Instruct")
    save_hf_checkpoint(path, tiny_config_for_real_tokenizer(), seed=7, tokenizer_dir=shared)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served-images")
    picture(64, 48).save(path / "small.png")
    (path / "loop-a").symlink_to(path / "loop-b")
    (path / "loop-b").symlink_to(path / "loop-a")
    return path


@pytest.fixture(scope="module")
def server(checkpoint, image_dir, tmp_path_factory):
    """(host, port) of a server with small caps and a max_tokens cap of a billion."""
    log = tmp_path_factory.mktemp("limits-log") / "server.log"
    args = [
        sys.executable, "-m", "mlx_smolvlm.server", "--model", str(checkpoint),
        "--port", "0", "--allowed-image-dir", str(image_dir), "--no-image-splitting",
        "--max-images", str(MAX_IMAGES), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-total-pixels", str(MAX_TOTAL_PIXELS),
        "--max-tokens-cap", "1000000000", "--max-pending", str(MAX_PENDING),
        "--fetch-timeout", str(FETCH_TIMEOUT), "--batch-window-ms", "20",
    ]  # fmt: skip
    env = {**os.environ, "MLX_SMOLVLM_QUIET": "1"}
    with serve(args, log, env) as address:
        yield address


def still_answers(address) -> None:
    status, body = call(address, chat("Still there?", max_tokens=2))
    assert status == 200, body


def raw(address, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes and read the whole answer (the server closes after an error)."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def parse(answer: bytes) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of a raw HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def post_raw(address, body: bytes) -> tuple[int, dict]:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
    status, _, payload = parse(raw(address, head.encode() + b"Connection: close\r\n\r\n" + body))
    return status, payload


# ---------------------------------------------------------------------------
# Caps per request


def test_too_many_images_are_refused_before_any_is_fetched(server):
    # A loopback port nobody listens on: fetching first would answer "cannot download" instead.
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/never-fetched.png"}}
    payload = chat("Compare.", max_tokens=2)
    payload["messages"][0]["content"] = [image] * (MAX_IMAGES + 1) + [{"type": "text", "text": "?"}]
    status, body = call(server, payload)
    assert_error(status, body, 400)
    assert body["error"]["code"] == "too_many_images" and "--max-images" in body["error"]["message"]


def test_total_pixels_of_a_request_are_capped(server):
    one = data_url(picture(300, 300))  # 90,000 pixels: under the per-image cap
    payload = chat("Compare.", one, max_tokens=2)
    payload["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": one}})
    status, body = call(server, payload)
    assert_error(status, body, 413)
    assert "--max-total-pixels" in body["error"]["message"]
    status, body = call(server, chat("What is it?", one, max_tokens=2))
    assert status == 200, body  # one of them alone is fine


def test_prompt_tokens_are_capped(server):
    status, body = call(server, chat("word " * 400, max_tokens=2))
    assert_error(status, body, 400)
    error = body["error"]
    assert error["code"] == "context_length_exceeded" and "--max-prompt-tokens" in error["message"]
    # Images count too: text under the cap, and a one-tile image (64 tokens) take it over.
    status, body = call(server, chat("word " * 240, max_tokens=2))
    assert status == 200, body
    status, body = call(server, chat("word " * 240, data_url(picture(40, 40)), max_tokens=2))
    assert_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded"


def test_a_billion_max_tokens_is_refused_not_a_crash(server):
    status, body = call(server, chat("Hi", max_tokens=1_000_000_000))
    assert_error(status, body, 400)
    assert body["error"]["param"] == "max_tokens" and "context window" in body["error"]["message"]
    still_answers(server)


@pytest.mark.parametrize(
    "params, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_parameters_are_400_naming_the_field(server, params, param):
    status, body = call(server, chat("Hi", **params))
    assert_error(status, body, 400)
    assert body["error"]["param"] == param and body["error"]["message"].startswith(param)


# ---------------------------------------------------------------------------
# Malformed input: always a 400 with an error object, never a dropped connection or a 500


@pytest.mark.parametrize(
    "body, where",
    [
        (b"[" * 100_000 + b"]" * 100_000, None),
        (b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}', "messages[0].content"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}',
            "messages[0].content[0].text",
        ),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}', "top_p"),
        (b"\xff\xfe\x00garbage", None),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud800"]}', "stop"),
    ],
)
def test_malformed_bodies_are_400(server, body, where):
    status, payload = post_raw(server, body)
    assert_error(status, payload, 400)
    assert payload["error"]["param"] == where


@pytest.mark.parametrize(
    "path",
    ["small\x00.png", "a" * 5000 + ".png", "/".join(["x"] * 3000), "loop-a", "loop-b/x.png"],
)
def test_hostile_image_paths_are_400(server, path):
    status, body = call(server, chat("What?", path, max_tokens=2))
    assert_error(status, body, 400)
    assert len(body["error"]["message"]) < 400  # the 5,000-character path is not echoed back
    status, body = call(server, chat("What?", "small.png", max_tokens=2))
    assert status == 200, body


def test_wrong_methods_are_json_405s(server):
    for method, path, allowed in [
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/health", "GET"),
        ("PUT", "/v1/models", "GET"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("PATCH", "/health", "GET"),
        ("OPTIONS", "/v1/models", "GET"),
        ("BREW", "/v1/models", None),
    ]:
        body = b"{}" if method != "GET" else None
        response = request(server, method, path, body)
        assert response.status == 405, (method, path)
        assert response.getheader("Content-Type") == "application/json"
        error = json.loads(response.read())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if allowed:
            assert response.getheader("Allow") == allowed
    response = request(server, "HEAD", "/health")
    assert response.status == 405 and response.read() == b""
    response = request(server, "GET", "/nowhere")
    assert response.status == 404 and json.loads(response.read())["error"]["code"] == "not_found"


def test_a_garbled_request_line_is_a_json_400(server):
    status, headers, body = parse(raw(server, b"THIS IS NOT HTTP\r\n\r\n"))
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    still_answers(server)


def test_models_lists_the_name_not_the_path(server, checkpoint):
    response = request(server, "GET", "/v1/models")
    text = response.read().decode()
    assert json.loads(text)["data"][0]["id"] == checkpoint.name
    assert str(checkpoint.parent) not in text


# ---------------------------------------------------------------------------
# Slow image hosts


class _Slow(BaseHTTPRequestHandler):
    """An image host that trickles a byte a second, or never answers at all."""

    def do_GET(self):
        if self.path == "/silent":
            time.sleep(30)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(30):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(1)
        except OSError:
            pass  # the server gave up on us, as it should

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("path", ["/trickle", "/silent"])
def test_image_downloads_have_an_overall_deadline(server, path):
    with ThreadingHTTPServer(("127.0.0.1", 0), _Slow) as host:
        host.daemon_threads = True
        threading.Thread(target=host.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{host.server_address[1]}{path}"
        status, body = call(server, chat("What?", url, max_tokens=2))
        host.shutdown()
    assert_error(status, body, 400)
    message = body["error"]["message"].lower()
    assert "cannot download" in message
    # The trickling host is cut off by the whole-download deadline, the silent one by a read timeout.
    assert (
        f"no whole image within {FETCH_TIMEOUT} s" if path == "/trickle" else "timed out"
    ) in message


# ---------------------------------------------------------------------------
# Bursts and clients that leave


def _one(address, payload: bytes) -> tuple[int, dict]:
    """One request on its own connection; any connection error is a failure of the test."""
    response = request(address, "POST", "/v1/chat/completions", payload)
    return response.status, json.loads(response.read())


def test_a_burst_of_40_connections_is_answered_or_refused_never_reset(server):
    payload = json.dumps(chat("Hi", max_tokens=1)).encode()
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: _one(server, payload), range(40)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= MAX_PENDING
    for status, body in answers:
        if status == 503:
            assert_error(status, body, 503)
            assert body["error"]["code"] == "server_busy"
    with ThreadPoolExecutor(40) as pool:
        health = list(pool.map(lambda _: request(server, "GET", "/health").status, range(40)))
    assert health == [200] * 40
    still_answers(server)


def test_a_non_streaming_client_that_leaves_is_cancelled(server):
    health = json.loads(request(server, "GET", "/health").read())
    payload = json.dumps(chat("Tell me a very long story about the sea.", max_tokens=4000))
    conn = socket.create_connection(server, timeout=30)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(payload)}\r\n\r\n"
    conn.sendall(head.encode() + payload.encode())
    time.sleep(1.5)  # it is generating now
    conn.close()
    still_answers(server)
    after = json.loads(request(server, "GET", "/health").read())
    assert after["cancelled"] == health["cancelled"] + 1


# ---------------------------------------------------------------------------
# 500s say nothing about the server's insides


def test_a_failure_inside_generation_shows_no_internals(checkpoint, monkeypatch):
    from mlx_smolvlm import server as server_module

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /srv/models/private")

    monkeypatch.setattr(server_module, "batch_stream_generate", broken)
    model, processor = load(checkpoint)
    served = server_module.create_server(model, processor, "tiny", port=0)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        for stream in (False, True):
            status, body = call(served.server_address[:2], chat("Hi", max_tokens=2, stream=stream))
            assert_error(status, body, 500)
            assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    finally:
        served.shutdown()
        served.server_close()


# ---------------------------------------------------------------------------
# Clients that hold connections: the connection cap and the request head's deadline

HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return load(checkpoint)


@contextmanager
def guarded(tiny, **limits):
    """(address, server) of an in-process server with the given `Limits`."""
    from mlx_smolvlm import server as server_module

    served = server_module.create_server(
        *tiny, "tiny", port=0, limits=server_module.Limits(**limits)
    )
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        yield served.server_address[:2], served
    finally:
        served.shutdown()
        served.server_close()


def wait_for_connections(served, count: int) -> None:
    """Wait until the server's handler threads hold `count` connections."""
    for _ in range(600):
        if served.connections == count:
            return
        time.sleep(0.05)
    pytest.fail(f"the server holds {served.connections} connections, not {count}")


def test_idle_connections_beyond_the_cap_get_a_503_and_the_server_recovers(tiny):
    with guarded(tiny, max_connections=4, header_timeout=120) as (address, served):
        idle = [socket.create_connection(address, timeout=30) for _ in range(4)]
        wait_for_connections(served, 4)
        for _ in range(6):  # more idle clients: answered at once, not left waiting
            with socket.create_connection(address, timeout=30) as conn:
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            status, headers, body = parse(answer)
            assert_error(status, body, 503)
            assert body["error"]["code"] == "too_many_connections"
            assert headers["Retry-After"] == "1" and headers["Connection"] == "close"
        status, body = call(address, chat("Hi", max_tokens=1))  # a real request, refused alike
        assert_error(status, body, 503)
        for conn in idle:
            conn.close()
        wait_for_connections(served, 0)
        still_answers(address)


def test_a_half_sent_request_head_is_a_408_and_the_server_answers_on(tiny):
    with guarded(tiny, header_timeout=HEADER_TIMEOUT) as (address, _):
        for head in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Le"):
            status, headers, body = parse(raw(address, head))  # read until the server closes
            assert_error(status, body, 408)
            assert body["error"]["code"] == "request_timeout"
            assert headers["Connection"] == "close"
        # A head trickled a byte at a time (a byte every 0.1 s, far within the 60 s a stalled
        # read may last) still has to be in by the deadline.
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
        with socket.create_connection(address, timeout=30) as conn:
            sent = 0
            while not select.select([conn], [], [], 0.1)[0] and sent < len(head):
                conn.send(head[sent : sent + 1])
                sent += 1
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert sent < len(head)
        status, _, body = parse(answer)
        assert_error(status, body, 408)
        still_answers(address)


def test_an_idle_keep_alive_connection_is_not_cut_by_the_head_deadline(tiny):
    with guarded(tiny, header_timeout=HEADER_TIMEOUT) as (address, _):
        conn = http.client.HTTPConnection(*address, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().read() and conn.sock is not None
        first = conn.sock
        time.sleep(2 * HEADER_TIMEOUT)  # idle between requests: the 60 s keep-alive applies
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        assert conn.sock is first  # the same connection answered
        conn.close()
