"""Test servers: the server run as a subprocess on a loopback port, and an HTTP client for it."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for any one HTTP exchange or the server start


@contextmanager
def serve(args: list[str], log_path: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """(host, port) of a server subprocess started with `args`, terminated on exit."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        yield wait_for_address(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


def wait_for_address(proc: subprocess.Popen, log) -> tuple[str, int]:
    """Read the 'Serving ... on http://host:port' line, failing with the log if it never comes."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        line = ""
    if " on http://" not in line:
        log.seek(0)
        pytest.fail(f"the server did not start: {line!r}\n{log.read()[-3000:]}")
    host, port = line.strip().rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def picture(width: int, height: int, hue: int = 90) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, hue, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 6, width // 2, height // 2), fill=(240, 200, 40))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(address, method: str, path: str, body: bytes | None = None):
    """(status, response) of one HTTP exchange; the response is left open to be read."""
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    return conn.getresponse()


def call(address, payload: dict | bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    """POST a payload and return the status and the decoded JSON body."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = request(address, "POST", path, body)
    return response.status, json.loads(response.read())


def chat(text: str, image_url: str | None = None, **params) -> dict:
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **params}


def assert_error(status: int, body: dict, expected: int) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
