"""The OpenAI-compatible server, run as a subprocess on a loopback port and spoken to over HTTP."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer
from serving import TIMEOUT, assert_error, call, chat, data_url, picture, request, serve

from mlx_smolvlm import generate, load

pytest.importorskip("transformers")
pytest.importorskip("torch")

CAP = 16  # --max-tokens-cap
MAX_PIXELS = 300_000
MAX_BODY = 2_000_000
ONE_TILE = {"do_image_splitting": False}  # the server runs with --no-image-splitting


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random SmolVLM with the real 256M tokenizer, chat template and processor."""
    from conftest import real_model_dir

    shared = real_model_dir("SmolVLM-256M-Instruct")
    path = tmp_path_factory.mktemp("tiny-smolvlm-server")
    save_hf_checkpoint(path, tiny_config_for_real_tokenizer(), seed=7, tokenizer_dir=shared)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    picture(320, 240).save(path / "picture.png")
    return path


@pytest.fixture(scope="module")
def server(checkpoint, image_dir, tmp_path_factory):
    """(host, port) of a server subprocess, terminated when the module's tests are done."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    args = [
        sys.executable, "-m", "mlx_smolvlm.server", "--model", str(checkpoint),
        "--host", "127.0.0.1", "--port", "0", "--allowed-image-dir", str(image_dir),
        "--max-tokens-cap", str(CAP), "--max-body-bytes", str(MAX_BODY),
        "--max-image-pixels", str(MAX_PIXELS), "--batch-window-ms", "300",
        "--max-batch-size", "8", "--no-image-splitting",
    ]  # fmt: skip
    with serve(args, log, dict(os.environ)) as address:
        yield address


def answer(address, payload: dict) -> str:
    status, body = call(address, payload)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_health_and_models(server):
    response = request(server, "GET", "/health")
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    response = request(server, "GET", "/v1/models")
    models = json.loads(response.read())
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    response = request(server, "GET", "/nowhere")
    assert response.status == 404 and "error" in json.loads(response.read())


def test_plain_completion_matches_generate(server, loaded):
    status, body = call(server, chat("Tell me about cats.", max_tokens=10))
    assert status == 200
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me about cats."}]}]
    alone = generate(model, processor, messages, max_tokens=10)
    assert choice["message"]["content"] == alone.text
    assert choice["finish_reason"] == alone.finish_reason
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        alone.prompt_tokens,
        alone.generation_tokens,
    )


def read_events(response) -> list:
    """The data payloads of a server-sent event stream, up to [DONE]."""
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
            if events[-1] == "[DONE]":
                break
    return events


def test_streamed_completion_joins_to_the_plain_one(server):
    payload = chat("Write a line about the sea.", max_tokens=12)
    plain = answer(server, payload)
    response = request(
        server, "POST", "/v1/chat/completions", json.dumps({**payload, "stream": True}).encode()
    )
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    events = read_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_image_as_data_url_http_url_and_allowed_path(server, loaded, image_dir):
    image = Image.open(image_dir / "picture.png")
    by_data = answer(server, chat("What is this?", data_url(image), max_tokens=8))
    model, processor = loaded
    alone = generate(
        model, processor, "What is this?", image.convert("RGB"), max_tokens=8, **ONE_TILE
    )
    assert by_data == alone.text

    by_path = answer(server, chat("What is this?", str(image_dir / "picture.png"), max_tokens=8))
    assert by_path == by_data
    assert answer(server, chat("What is this?", "picture.png", max_tokens=8)) == by_data
    handler = partial(SimpleHTTPRequestHandler, directory=str(image_dir))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/picture.png"
        try:
            assert answer(server, chat("What is this?", url, max_tokens=8)) == by_data
        finally:
            files.shutdown()


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[1, 2]",
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        {"messages": [{"role": "user", "content": 5}]},
        chat("hi", max_tokens=0),
        chat("hi", max_tokens="ten"),
        chat("hi", temperature=True),
        chat("hi", temperature=3),
        chat("hi", seed=-1),
        chat("hi", stop=[1, 2]),
        chat("hi", stream="yes"),
        chat("hi", n=2),
        chat("hi <image> there"),
        chat("hi", "data:image/png;base64,@@@"),
        chat("hi", "data:image/png;base64," + base64.b64encode(b"not an image").decode()),
        chat("hi", "/etc/passwd"),
        chat("hi", "../images/../../picture.png"),
    ],
)
def test_bad_requests_are_400(server, payload):
    status, body = call(server, payload)
    assert_error(status, body, 400)
    assert body["error"]["type"] == "invalid_request_error"


def test_oversized_image_and_body_are_413(server):
    status, body = call(server, chat("hi", data_url(picture(700, 500))))
    assert_error(status, body, 413)
    assert "too large" in body["error"]["message"]
    status, body = call(server, chat("x" * (MAX_BODY + 10)))
    assert_error(status, body, 413)
    assert answer(server, chat("Still there?", max_tokens=2))  # the server carries on


def test_a_client_leaving_a_stream_does_not_disturb_the_server(server):
    payload = json.dumps(chat("Tell me a long story.", max_tokens=CAP, stream=True)).encode()
    response = request(server, "POST", "/v1/chat/completions", payload)
    assert response.status == 200 and response.readline()
    response.close()
    assert answer(server, chat("Are you there?", max_tokens=3))


def test_max_tokens_cap_stop_strings_and_seed(server):
    status, body = call(server, chat("Count to one hundred.", max_tokens=1000))
    assert_error(status, body, 400)  # above the cap: refused, as OpenAI does, not cut silently
    assert body["error"]["param"] == "max_tokens" and str(CAP) in body["error"]["message"]
    full = answer(server, chat("Count to one hundred.", max_tokens=CAP))
    stop = full[4:7]
    assert (
        answer(server, chat("Count to one hundred.", max_tokens=CAP, stop=stop))
        == full[: full.find(stop)]
    )
    sampled = chat("Pick a word.", max_tokens=8, temperature=1.0, top_p=0.9, seed=42)
    assert answer(server, sampled) == answer(server, sampled)


def test_concurrent_requests_get_the_answers_they_get_alone(server):
    prompts = [chat(f"Question {i}: " + "why " * i, max_tokens=6 + i) for i in range(8)]
    alone = [answer(server, p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(partial(answer, server), prompts))
    assert together == alone
    stats = json.loads(request(server, "GET", "/health").read())
    assert stats["largest_batch"] > 1  # the worker did batch them


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url="http://{}:{}/v1".format(*server), api_key="unused", timeout=TIMEOUT
    )
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=6, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=6)


def test_a_failing_generation_is_a_500_and_the_others_carry_on(loaded, monkeypatch):
    from mlx_smolvlm import server as server_module

    real = server_module.batch_stream_generate

    def flaky(model, processor, prompts, **kwargs):
        if any("BOOM" in json.dumps(p) for p in prompts):
            raise RuntimeError("boom")
        return real(model, processor, prompts, **kwargs)

    monkeypatch.setattr(server_module, "batch_stream_generate", flaky)
    model, processor = loaded
    served = server_module.create_server(model, processor, "tiny", port=0, batch_window_ms=300)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    address = served.server_address[:2]
    try:
        with ThreadPoolExecutor(3) as pool:
            bad = pool.submit(call, address, chat("BOOM", max_tokens=4))
            streamed = pool.submit(call, address, chat("BOOM", max_tokens=4, stream=True))
            good = pool.submit(answer, address, chat("Fine?", max_tokens=4))
            for status, body in (bad.result(), streamed.result()):
                assert_error(status, body, 500)
                assert body["error"]["type"] == "server_error"
            assert good.result()
        assert answer(address, chat("Still fine?", max_tokens=3))
    finally:
        served.shutdown()
        served.server_close()


def test_remote_images_can_be_turned_off():
    from mlx_smolvlm.server import ApiError, Limits, fetch_image

    with pytest.raises(ApiError, match="does not fetch image URLs"):
        fetch_image("http://169.254.169.254/latest", Limits(remote_images=False))
