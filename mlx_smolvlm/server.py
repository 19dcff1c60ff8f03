"""OpenAI-compatible HTTP server: `python -m mlx_smolvlm.server --model ...`.

Built on the standard library's `ThreadingHTTPServer` rather than FastAPI + uvicorn: three
endpoints that take and give JSON, plus server-sent events, need little framework, and the
package gains no dependency. Handler threads parse and check requests and fetch images; ONE
worker thread owns the model (MLX is not thread-safe) and runs the queued requests, several
at a time through `batch_stream_generate` when they arrive within `--batch-window-ms`.
"""

from __future__ import annotations

import itertools
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
from PIL import Image

from .generation import GenerationResult, SamplingParams, batch_stream_generate
from .generation.generate import render_prompt
from .loading import load, resolve_model
from .processing.fetch import FetchError, FetchLimits, open_image
from .processing.image import load_image
from .processing.messages import MessageError, request_messages
from .processing.processor import IMAGE_TOKEN
from .utils.options import dtype_option, image_kwargs, model_option, tiling_options

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered with an OpenAI-style error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        """The JSON error object."""
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_tokens_cap: int = 2048
    default_max_tokens: int = 512
    allowed_image_dir: Path | None = None
    remote_images: bool = True  # fetch http(s) image URLs (off: only data: URLs and local files)


@dataclass
class ChatRequest:
    """A checked chat completion request, its images already loaded."""

    messages: list[dict]
    sampling: SamplingParams
    stream: bool = False
    seed: int | None = None

    @property
    def batchable(self) -> bool:
        """Seeded sampling runs alone so that the seed alone decides its tokens."""
        return self.seed is None or self.sampling.temperature == 0


# ---------------------------------------------------------------------------
# Request parsing


def parse_request(body: bytes, limits: Limits) -> ChatRequest:
    """Check a chat completion body and load its images; ApiError on anything wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(f"the body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object")
    if data.get("n", 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    max_tokens = _number(data, "max_tokens", int, 1, None, None)
    max_tokens = _number(data, "max_completion_tokens", int, 1, None, max_tokens)
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        print(
            f"Warning: a request asked for max_tokens {max_tokens}; its answer stops at "
            f"--max-tokens-cap {limits.max_tokens_cap}",
            file=sys.stderr,
            flush=True,
        )
    sampling = SamplingParams(
        # Asking for more than the cap is not an error: the answer stops at the cap ("length").
        max_tokens=min(max_tokens or limits.default_max_tokens, limits.max_tokens_cap),
        # Greedy unless asked otherwise (OpenAI defaults to 1.0): small VLMs ramble when sampled.
        temperature=float(_number(data, "temperature", float, 0.0, 2.0, 0.0)),
        top_p=float(_number(data, "top_p", float, 0.0, 1.0, 1.0)),
        stop=_stop_strings(data.get("stop")),
    )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", param="stream")
    messages = _messages(data.get("messages"), limits)
    return ChatRequest(messages, sampling, stream, _number(data, "seed", int, 0, 2**64 - 1, None))


def _number(data: dict, key: str, kind: type, low: Any, high: Any, default: Any) -> Any:
    """A numeric field checked for type and range, or `default` when absent or null."""
    value = data.get(key)
    if value is None:
        return default
    types = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, types):
        raise ApiError(f"{key} must be a{'n integer' if kind is int else ' number'}", param=key)
    if low is not None and value < low:
        raise ApiError(f"{key} must be at least {low}", param=key)
    if high is not None and value > high:
        raise ApiError(f"{key} must be at most {high}", param=key)
    return value


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
            param="stop",
        )
    return tuple(stops)


def _messages(messages: Any, limits: Limits) -> list[dict]:
    """Checked messages with each image part replaced by the loaded image."""
    try:
        return request_messages(messages, lambda url, where: fetch_image(url, limits, where))
    except MessageError as e:
        raise ApiError(str(e), param=e.where) from e


# ---------------------------------------------------------------------------
# Images


def fetch_image(url: str, limits: Limits, where: str = "image_url") -> Image.Image:
    """Load a data URL, an http(s) URL or an allow-listed local file within the size limits."""
    fetch_limits = FetchLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=limits.max_image_pixels,
        remote=limits.remote_images,
        local=limits.allowed_image_dir is not None,
        allowed_dir=limits.allowed_image_dir,
    )
    try:
        image = open_image(url, fetch_limits, where)
    except FetchError as e:
        if e.too_large:
            raise ApiError(str(e), 413, where, "image_too_large") from e
        raise ApiError(str(e), param=where) from e
    # The same EXIF rotation and RGB conversion that `generate` applies to files and URLs.
    return load_image(image)


# ---------------------------------------------------------------------------
# The worker that owns the model


@dataclass
class Job:
    """A request waiting for the worker, and the channel its results come back on."""

    request: ChatRequest
    events: queue.Queue = field(default_factory=queue.Queue)  # GenerationResults or an error
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    finished: bool = False

    def put(self, result: GenerationResult) -> None:
        """Hand one result (a text segment; the last one has finish_reason) to the handler."""
        self.started = True
        self.finished = result.finish_reason is not None
        self.events.put(result)

    def results(self) -> Iterator[GenerationResult]:
        """The results as the worker produces them, up to the final one."""
        while True:
            event = self.events.get()
            if isinstance(event, Exception):
                raise ApiError(
                    f"generation failed: {type(event).__name__}: {event}",
                    500,
                    code="generation_failed",
                    kind="server_error",
                )
            yield event
            if event.finish_reason is not None:
                return


class Worker(threading.Thread):
    """The one thread that runs the model: it takes queued jobs and generates, in batches."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        batch_window_s: float = 0.01,
        max_batch_size: int = 8,
        image_kwargs: dict | None = None,
    ):
        super().__init__(name="mlx-smolvlm-worker", daemon=True)
        self.model, self.processor = model, processor
        self.batch_window_s, self.max_batch_size = batch_window_s, max_batch_size
        self.image_kwargs = image_kwargs or {}
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.held: Job | None = None  # taken while gathering a batch it cannot join
        self.batches = 0
        self.largest_batch = 0

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request; its results arrive on the returned job."""
        job = Job(request)
        self.jobs.put(job)
        return job

    def stats(self) -> dict:
        """Counters for /health."""
        return {
            "queued": self.jobs.qsize(),
            "batches": self.batches,
            "largest_batch": self.largest_batch,
        }

    def run(self) -> None:
        while True:
            self._run(self._gather())

    def _gather(self) -> list[Job]:
        """The next job, joined by the batchable ones that arrive within the window."""
        first, self.held = self.held or self.jobs.get(), None
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while first.request.batchable and len(batch) < self.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if not job.request.batchable:
                self.held = job
                break
            batch.append(job)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        """Generate for the jobs; an exception becomes each unfinished job's error, never the thread's."""
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            self._generate(jobs)
        except Exception as e:
            traceback.print_exc()
            if len(jobs) > 1 and not any(job.started for job in jobs):
                # Retry one by one so that a request that breaks generation fails alone.
                for job in jobs:
                    self._run([job])
                return
            for job in jobs:
                if not job.finished:
                    job.events.put(e)

    def _generate(self, jobs: list[Job]) -> None:
        requests = [job.request for job in jobs]
        events = batch_stream_generate(
            self.model,
            self.processor,
            [r.messages for r in requests],
            sampling=[r.sampling for r in requests],
            seed=requests[0].seed if len(requests) == 1 else None,
            should_stop=lambda i: jobs[i].cancelled.is_set(),
            **self.image_kwargs,
        )
        for i, result in events:
            jobs[i].put(result)


# ---------------------------------------------------------------------------
# HTTP


class Server(ThreadingHTTPServer):
    """The HTTP server and what its handlers share."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], worker: Worker, limits: Limits, model_id: str):
        super().__init__(address, Handler)
        self.worker, self.limits, self.model_id = worker, limits, model_id
        self.created = int(time.time())


class Handler(BaseHTTPRequestHandler):
    """GET /health, GET /v1/models, POST /v1/chat/completions."""

    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    timeout = 60  # seconds a client may stall while sending, or idle between requests
    # Reading and dropping a moderately oversized body lets the client see the 413 rather
    # than a connection reset; anything beyond this is cut off.
    drain_limit = 64 * 2**20

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok", **self.server.worker.stats()})
        elif self.path == "/v1/models":
            model = {
                "id": self.server.model_id,
                "object": "model",
                "created": self.server.created,
                "owned_by": "mlx-smolvlm",
            }
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(ApiError(f"no route GET {self.path}", 404, code="not_found"))

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path != "/v1/chat/completions":
                raise ApiError(f"no route POST {self.path}", 404, code="not_found")
            request = parse_request(body, self.server.limits)
            self._check_prompt(request)
            job = self.server.worker.submit(request)
            results = job.results()
            first = next(results)  # wait before answering: an early failure is still a 500
        except ApiError as e:
            self._error(e)
            return
        if request.stream:
            self._stream(job, itertools.chain([first], results))
        else:
            self._complete(itertools.chain([first], results))

    def _body(self) -> bytes:
        """The request body, within the size limit."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError("a Content-Length header is required", 411, code="length_required")
        length, limit = int(length), self.server.limits.max_body_bytes
        if length > limit:
            self._drain(length)
            raise ApiError(
                f"the body has {length} bytes, above the limit of {limit}",
                413,
                code="body_too_large",
            )
        return self.rfile.read(length)

    def _drain(self, length: int) -> None:
        if length > self.drain_limit:
            self.close_connection = True
            return
        while length > 0:
            data = self.rfile.read(min(length, 2**20))
            if not data:
                break
            length -= len(data)

    def _check_prompt(self, request: ChatRequest) -> None:
        """Render the chat template here so that bad messages are a 400, not a worker error."""
        try:
            text, images, _ = render_prompt(self.server.worker.processor, request.messages)
        except Exception as e:
            raise ApiError(f"messages cannot be rendered: {e}", param="messages") from e
        if text.count(IMAGE_TOKEN) != len(images):
            raise ApiError(f"message text may not contain {IMAGE_TOKEN} itself", param="messages")

    def _complete(self, results: Iterator[GenerationResult]) -> None:
        text = []
        try:
            for result in results:
                text.append(result.text)
        except ApiError as e:
            self._error(e)
            return
        message = {"role": "assistant", "content": "".join(text)}
        choice = {"index": 0, "message": message, "finish_reason": result.finish_reason}
        body = {**self._header("chat.completion"), "choices": [choice], "usage": _usage(result)}
        self._json(200, body)

    def _stream(self, job: Job, results: Iterator[GenerationResult]) -> None:
        """Server-sent events: a role chunk, content chunks, a final chunk, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        header = self._header("chat.completion.chunk")

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**header, "choices": [choice], **extra}

        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            try:
                for result in results:
                    if result.text:
                        self._event(chunk({"content": result.text}))
                    if result.finish_reason is not None:
                        self._event(chunk({}, result.finish_reason, usage=_usage(result)))
            except ApiError as e:
                self._event(e.body())  # the status line is gone; the error goes in the stream
            self._event("[DONE]")
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop spending the worker's time on it
            self.close_connection = True

    def _header(self, kind: str) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.server.model_id,
        }

    def _event(self, data: dict | str) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: ApiError) -> None:
        self._json(error.status, error.body())


def _usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generation_tokens,
        "total_tokens": result.prompt_tokens + result.generation_tokens,
    }


def create_server(
    model: Any,
    processor: Any,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits | None = None,
    batch_window_ms: float = 10.0,
    max_batch_size: int = 8,
    image_kwargs: dict | None = None,
) -> Server:
    """A bound server with its worker running; call `serve_forever()` on it."""
    worker = Worker(model, processor, batch_window_ms / 1000, max_batch_size, image_kwargs)
    worker.start()
    return Server((host, port), worker, limits or Limits(), model_id)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option(adapter_default=True)
@click.option(
    "--adapter-path", default=None, help="LoRA adapters to apply (from mlx_smolvlm.lora)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port (0 picks a free one).")
@click.option(
    "--allowed-image-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Allow local image paths under this directory (off by default).",
)
@click.option(
    "--remote-images/--no-remote-images",
    default=True,
    show_default=True,
    help="Fetch http(s) image URLs for clients (turn off when clients may reach addresses "
    "the server can but they should not).",
)
@click.option("--max-tokens-cap", default=2048, show_default=True, help="Most tokens per answer.")
@click.option("--max-body-bytes", default=20 * 2**20, show_default=True, help="Request size limit.")
@click.option("--max-image-bytes", default=20 * 2**20, show_default=True, help="Per image.")
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, help="Per image.")
@click.option(
    "--batch-window-ms",
    default=10.0,
    show_default=True,
    help="How long the worker waits for more requests to batch with the first one.",
)
@click.option("--max-batch-size", default=8, show_default=True, help="Most requests per batch.")
@dtype_option()
@tiling_options
def main(
    model,
    adapter_path,
    host,
    port,
    allowed_image_dir,
    remote_images,
    max_tokens_cap,
    max_body_bytes,
    max_image_bytes,
    max_image_pixels,
    batch_window_ms,
    max_batch_size,
    dtype,
    no_image_splitting,
    longest_edge,
    max_tiles,
):
    """Serve a SmolVLM model with an OpenAI-compatible chat completions API."""
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        max_tokens_cap=max_tokens_cap,
        default_max_tokens=min(512, max_tokens_cap),
        allowed_image_dir=allowed_image_dir,
        remote_images=remote_images,
    )
    kwargs = image_kwargs(no_image_splitting, longest_edge, max_tiles)
    try:
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    model = str(model or resolve_model(None, adapter_path)[0])
    server = create_server(
        vlm, processor, model, host, port, limits, batch_window_ms, max_batch_size, kwargs
    )
    host, port = server.server_address[:2]
    print(f"Serving {model} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
