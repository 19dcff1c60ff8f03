"""OpenAI-compatible HTTP server: `python -m mlx_smolvlm.server --model ...`.

Built on the standard library's `ThreadingHTTPServer` rather than FastAPI + uvicorn: three
endpoints that take and give JSON, plus server-sent events, need little framework, and the
package gains no dependency. Handler threads parse and check requests and fetch images; ONE
worker thread owns the model (MLX is not thread-safe) and runs the queued requests, several
at a time through `batch_stream_generate` when they arrive within `--batch-window-ms`.
"""

from __future__ import annotations

import io
import itertools
import json
import queue
import select
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
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
from .processing.messages import IMAGE_TYPES, MessageError, request_messages
from .processing.processor import IMAGE_TOKEN
from .utils.options import dtype_option, image_kwargs, model_option, tiling_options
from .utils.validation import (
    MAX_SEED,
    Command,
    ValidationError,
    check_float,
    check_image_kwargs,
    check_int,
    check_text,
)

CLIENT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
REFUSED_LINGER_S = 2.0  # how long a refused connection stays half-open for its client to read
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
    max_total_pixels: int = 2 * 4096 * 4096  # all the images of one request together
    max_images: int = 4
    max_prompt_tokens: int = 4096  # after the images' tokens are counted
    max_tokens_cap: int = 2048  # a larger max_tokens is a 400, as OpenAI answers
    default_max_tokens: int = 512  # when the request names none (lowered to fit the window)
    allowed_image_dir: Path | None = None
    remote_images: bool = True  # fetch http(s) image URLs (off: only data: URLs and local files)
    fetch_timeout: float = 15.0  # seconds for a whole remote image download
    max_pending: int = 32  # requests queued or running; more are answered 503
    max_connections: int = 64  # connections open at once, each a thread; more are answered 503
    header_timeout: float = 10.0  # seconds to send a request head (status line and headers)


@dataclass
class ChatRequest:
    """A checked chat completion request, its images already loaded."""

    messages: list[dict]
    sampling: SamplingParams
    stream: bool = False
    seed: int | None = None
    max_tokens_given: bool = False  # False: the default, which may be lowered to fit

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
    except RecursionError:
        raise ApiError("the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object")
    if data.get("n", 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    try:
        max_tokens = _field(data, "max_tokens", check_int, 1)
        max_tokens = _field(data, "max_completion_tokens", check_int, 1) or max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_cap:
            raise ValidationError(
                "max_tokens",
                f"is {max_tokens}, above this server's cap of {limits.max_tokens_cap} "
                "(--max-tokens-cap)",
            )
        sampling = SamplingParams(
            max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens_cap),
            # Greedy unless asked otherwise (OpenAI defaults to 1.0): small VLMs ramble sampled.
            temperature=_field(data, "temperature", check_float, 0.0, 2.0) or 0.0,
            top_p=_field(data, "top_p", check_float, 0.0, 1.0, low_open=True) or 1.0,
            stop=_stop_strings(data.get("stop")),
        )
        seed = _field(data, "seed", check_int, 0, MAX_SEED)
    except ValidationError as e:
        raise ApiError(str(e), param=e.param) from None
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", param="stream")
    messages = _messages(data.get("messages"), limits)
    return ChatRequest(messages, sampling, stream, seed, max_tokens is not None)


def _field(data: dict, key: str, check: Callable, *args: Any, **kwargs: Any) -> Any:
    """A field checked by the validation layer, or None when absent or null."""
    value = data.get(key)
    return None if value is None else check(key, value, *args, **kwargs)


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
    return tuple(_text(s, "stop") for s in stops)


def _messages(messages: Any, limits: Limits) -> list[dict]:
    """Checked messages with each image part replaced by the loaded image."""
    if isinstance(messages, list):
        images = sum(
            isinstance(part, dict) and part.get("type") in IMAGE_TYPES
            for message in messages
            if isinstance(message, dict) and isinstance(message.get("content"), list)
            for part in message["content"]
        )
        if images > limits.max_images:  # counted before any image is fetched
            raise ApiError(
                f"the request has {images} images; this server takes at most "
                f"{limits.max_images} (--max-images)",
                param="messages",
                code="too_many_images",
            )
    budget = [limits.max_total_pixels]  # pixels the request's images may still use

    def fetch(url: str, where: str) -> Image.Image:
        image = fetch_image(url, limits, where, budget[0])
        budget[0] -= image.width * image.height
        return image

    try:
        return request_messages(messages, fetch)
    except MessageError as e:
        raise ApiError(str(e), param=e.where) from e


def _text(text: str, where: str) -> str:
    """Text that the tokenizer can take (no lone surrogates)."""
    try:
        return check_text(where, text)
    except ValidationError as e:
        raise ApiError(str(e), param=where) from None


# ---------------------------------------------------------------------------
# Images


def fetch_image(
    url: str, limits: Limits, where: str = "image_url", pixel_budget: int | None = None
) -> Image.Image:
    """Load a data URL, an http(s) URL or an allow-listed local file within the size limits.

    `pixel_budget` is what the request's images may still use of `max_total_pixels`.
    """
    budget = limits.max_total_pixels if pixel_budget is None else pixel_budget
    fetch_limits = FetchLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=min(limits.max_image_pixels, budget),
        remote=limits.remote_images,
        local=limits.allowed_image_dir is not None,
        allowed_dir=limits.allowed_image_dir,
        timeout=limits.fetch_timeout,
    )
    try:
        image = open_image(url, fetch_limits, where)
    except FetchError as e:
        if e.too_large:
            total = budget < limits.max_image_pixels
            note = " (the request's images exceed --max-total-pixels together)" if total else ""
            raise ApiError(str(e) + note, 413, where, "image_too_large") from e
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

    def results(self, client_alive: Callable[[], bool] | None = None) -> Iterator[GenerationResult]:
        """The results as the worker produces them, up to the final one.

        While waiting, `client_alive` is asked a few times a second; once it says no, the job
        is cancelled (the worker drops it or stops it at its next token) and `ClientGone` is
        raised.
        """
        next_check = time.monotonic() + CLIENT_POLL_S
        while True:
            try:
                event = self.events.get(timeout=CLIENT_POLL_S)
            except queue.Empty:
                event = None
            if client_alive is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + CLIENT_POLL_S
                if not client_alive():
                    self.cancelled.set()
                    raise ClientGone()
            if event is None:
                continue
            if isinstance(event, Exception):
                # The details go to the server log, never to the client.
                raise ApiError(
                    "generation failed; the server log has the details",
                    500,
                    code="generation_failed",
                    kind="server_error",
                )
            yield event
            if event.finish_reason is not None:
                return


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran."""


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
        self.cancelled = 0

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
            "cancelled": self.cancelled,
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
        live = [job for job in jobs if not job.cancelled.is_set()]
        self.cancelled += len(jobs) - len(live)
        jobs = live
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
            self.cancelled += result.finish_reason == "cancelled"
            jobs[i].put(result)


# ---------------------------------------------------------------------------
# HTTP


class Server(ThreadingHTTPServer):
    """The HTTP server and what its handlers share."""

    daemon_threads = True
    # Connections waiting to be accepted: a burst queues here instead of being reset.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], worker: Worker, limits: Limits, model_id: str):
        super().__init__(address, Handler)
        self.worker, self.limits, self.model_id = worker, limits, model_id
        self.created = int(time.time())
        self.pending = 0  # chat requests being checked, queued or generated
        self.connections = 0  # connections with a handler thread
        self.refused: deque[tuple[float, socket.socket]] = deque()  # (close time, connection)
        self.lock = threading.Lock()
        error = ApiError(
            f"the server has {limits.max_connections} connections open, its limit; retry shortly",
            503,
            code="too_many_connections",
            kind="server_error",
        )
        body = json.dumps(error.body()).encode()
        self.refusal = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode() + body

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Serve a connection on a thread of its own, or refuse it at `max_connections`."""
        with self.lock:
            admitted = self.connections < self.limits.max_connections
            if admitted:
                self.connections += 1
        if not admitted:
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: no thread will give the place back
            self.closed_one()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.closed_one()

    def closed_one(self) -> None:
        with self.lock:
            self.connections -= 1

    def refuse(self, request: socket.socket) -> None:
        """Answer 503 and close, here on the accepting thread: no thread for the connection."""
        # A 503 rather than a refused or reset connection: OpenAI clients retry both, but a 503
        # carries Retry-After, which they honour, and an error object that says why (a reset is
        # only a "Connection error"). The connection then stays half-open for a moment, since
        # closing it with the request unread would reset it and the client could lose the 503.
        request.setblocking(False)
        try:
            request.sendall(self.refusal)  # a few hundred bytes: a new socket's buffer holds them
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        self.refused.append((time.monotonic() + REFUSED_LINGER_S, request))
        if len(self.refused) > self.limits.max_connections:
            self.refused.popleft()[1].close()

    def service_actions(self) -> None:
        """Close the refused connections whose clients have left or had their time."""
        super().service_actions()
        now, kept = time.monotonic(), deque()
        for deadline, request in self.refused:
            if now >= deadline or _finished(request):
                request.close()
            else:
                kept.append((deadline, request))
        self.refused = kept

    def server_close(self) -> None:
        super().server_close()
        for _, request in self.refused:
            request.close()

    def admit(self) -> bool:
        """Take a place for one more chat request, unless `max_pending` are in already."""
        with self.lock:
            if self.pending >= self.limits.max_pending:
                return False
            self.pending += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.pending -= 1


def _finished(request: socket.socket) -> bool:
    """Whether a refused (non-blocking) connection's client has closed it; drops what it sent."""
    try:
        for _ in range(16):  # at most 1 MiB a turn: a client that keeps sending waits its turn
            if not request.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


class HeadTimeout(Exception):
    """A request head that did not arrive within `Limits.header_timeout`."""


class HeadReader(io.RawIOBase):
    """A connection's reads, with a deadline for each request head.

    The first head's clock starts with the connection, a later (keep-alive) one's with its first
    byte, so a client that sends nothing, or its head a byte at a time, cannot hold a thread.
    Other reads (waiting for the next request, bodies) wait up to `idle` seconds for each byte.
    """

    def __init__(self, sock: socket.socket, idle: float, head_time: float):
        self.sock, self.idle, self.head_time = sock, idle, head_time
        self.deadline: float | None = time.monotonic() + head_time
        self.between = False  # between requests: the next byte starts a head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            count = self.sock.recv_into(buffer)
            if count and self.between:
                self.deadline, self.between = time.monotonic() + self.head_time, False
            return count
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HeadTimeout
        self.sock.settimeout(min(left, self.idle))
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            if left < self.idle:
                raise HeadTimeout from None
            raise
        finally:
            self.sock.settimeout(self.idle)

    def head_read(self) -> None:
        """The head is in: no deadline for the body."""
        self.deadline = None

    def next_request(self) -> None:
        """The next head's clock starts with its first byte."""
        self.deadline, self.between = None, True


ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}


class Handler(BaseHTTPRequestHandler):
    """GET /health, GET /v1/models, POST /v1/chat/completions; JSON errors for the rest."""

    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    timeout = 60  # seconds a client may stall while sending, or idle between requests
    # Reading and dropping a moderately oversized body lets the client see the 413 rather
    # than a connection reset; anything beyond this is cut off.
    drain_limit = 64 * 2**20

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file, replaced by one with the head deadline
        limit = self.server.limits.header_timeout
        self.reader = HeadReader(self.connection, self.timeout, limit)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """One request; a head that misses its deadline is answered 408."""
        self.command = self.requestline = ""  # not the previous request's, should this one fail
        try:
            super().handle_one_request()
        except HeadTimeout:
            limit = self.server.limits.header_timeout
            self._fail(
                ApiError(
                    f"the request head did not arrive within {limit:g} s",
                    408,
                    code="request_timeout",
                )
            )
        self.reader.next_request()

    def parse_request(self) -> bool:
        """Read the request line's parts and the headers; the head deadline ends here."""
        try:
            return super().parse_request()
        finally:
            self.reader.head_read()

    def do_GET(self) -> None:
        if self._route("GET") is None:
            return
        if self.path.split("?", 1)[0] == "/health":
            self._json(200, {"status": "ok", **self.server.worker.stats()})
            return
        model = {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-smolvlm",
        }
        self._json(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self._route("POST") is None:
                return
        except ApiError as e:
            self._error(e)
            return
        if not self.server.admit():
            self._error(
                ApiError(
                    f"the server is busy ({self.server.limits.max_pending} requests in); "
                    "retry shortly",
                    503,
                    code="server_busy",
                    kind="server_error",
                ),
                {"Retry-After": "1"},
            )
            return
        try:
            self._chat(body)
        except ClientGone:
            self.close_connection = True
        except Exception:
            # A bug, not the client's fault: the log has it, the client a generic 500.
            traceback.print_exc()
            self.close_connection = True
            self._error(
                ApiError("internal server error", 500, code="internal_error", kind="server_error")
            )
        finally:
            self.server.release()

    def _chat(self, body: bytes) -> None:
        try:
            request = parse_request(body, self.server.limits)
            self._check_prompt(request)
            job = self.server.worker.submit(request)
            results = job.results(self._client_alive)
            first = next(results)  # wait before answering: an early failure is still a 500
        except ApiError as e:
            self._error(e)
            return
        if request.stream:
            self._stream(job, itertools.chain([first], results))
        else:
            self._complete(itertools.chain([first], results))

    def _method_not_allowed(self) -> None:
        if self._route(self.command) is not None:  # a route that takes this method
            self._error(ApiError(f"{self.command} is not supported", 405, code="bad_method"))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = _method_not_allowed

    def _route(self, method: str) -> str | None:
        """The route's method when it is `method`; otherwise answer 404 or 405 and give None."""
        allowed = ROUTES.get(self.path.split("?", 1)[0])
        if allowed is None:
            self._error(ApiError(f"no route {method} {self.path:.200}", 404, code="not_found"))
            return None
        if allowed != method:
            self._error(
                ApiError(
                    f"{self.path} takes {allowed}, not {method}",
                    405,
                    code="method_not_allowed",
                ),
                {"Allow": allowed},
            )
            return None
        return allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (bad request line, unknown method...) as JSON."""
        if code == 501:  # a method nobody here takes
            code, message = 405, f"{self.command!r:.40} is not supported"
        self._fail(ApiError(message or "bad request", code, code="bad_request"))

    def _fail(self, error: ApiError) -> None:
        """Answer a request that could not be read, and close its connection."""
        # A garbled request line leaves the version at HTTP/0.9, which would drop the status line.
        self.request_version = self.protocol_version
        self.close_connection = True
        try:
            self._error(error)
        except OSError:
            pass

    def _client_alive(self) -> bool:
        """Whether the client still holds its connection open (it may have sent more)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

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
        """Render and count the prompt here, so that bad or oversized messages are a 400
        before the worker spends time on them; fit the default max_tokens to the window."""
        worker, limits = self.server.worker, self.server.limits
        try:
            text, images, _ = render_prompt(worker.processor, request.messages)
        except ApiError:
            raise
        except Exception as e:
            reason = " ".join(str(e).split())[:300]
            raise ApiError(f"messages cannot be rendered: {reason}", param="messages") from e
        if text.count(IMAGE_TOKEN) != len(images):
            raise ApiError(f"message text may not contain {IMAGE_TOKEN} itself", param="messages")
        try:
            ids = worker.processor(
                text=text, images=images or None, return_tensors=None, **worker.image_kwargs
            )["input_ids"][0]
        except (ValueError, OSError) as e:
            reason = " ".join(str(e).split())[:300]
            raise ApiError(f"the images cannot be processed: {reason}", param="messages") from e
        window = worker.model.config.text_config.max_position_embeddings
        most = min(limits.max_prompt_tokens, window - 1)
        if len(ids) > most:
            raise ApiError(
                f"the prompt has {len(ids)} tokens (images included); this server takes at "
                f"most {most} (--max-prompt-tokens, context window {window})",
                param="messages",
                code="context_length_exceeded",
            )
        room = window - len(ids)
        if request.sampling.max_tokens > room:
            if request.max_tokens_given:
                raise ApiError(
                    f"max_tokens {request.sampling.max_tokens} does not fit: the "
                    f"{len(ids)}-token prompt leaves {room} of the {window}-token context window",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            request.sampling = replace(request.sampling, max_tokens=room)

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

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, error: ApiError, headers: dict | None = None) -> None:
        self._json(error.status, error.body(), headers)


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


def model_name(model: str) -> str:
    """What /v1/models and the answers call the model: a local folder's name, never its path."""
    return Path(model).expanduser().name if Path(model).expanduser().exists() else model


POSITIVE = click.IntRange(min=1)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(adapter_default=True)
@click.option(
    "--adapter-path", default=None, help="LoRA adapters to apply (from mlx_smolvlm.lora)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port (0 picks a free one).",
)
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
@click.option(
    "--max-tokens-cap",
    type=POSITIVE,
    default=2048,
    show_default=True,
    help="Most tokens per answer; a request asking for more is a 400.",
)
@click.option(
    "--max-prompt-tokens",
    type=POSITIVE,
    default=4096,
    show_default=True,
    help="Most prompt tokens per request, images included (never above the context window).",
)
@click.option("--max-images", type=POSITIVE, default=4, show_default=True, help="Per request.")
@click.option(
    "--max-body-bytes",
    type=POSITIVE,
    default=20 * 2**20,
    show_default=True,
    help="Request size limit.",
)
@click.option(
    "--max-image-bytes", type=POSITIVE, default=20 * 2**20, show_default=True, help="Per image."
)
@click.option(
    "--max-image-pixels", type=POSITIVE, default=4096 * 4096, show_default=True, help="Per image."
)
@click.option(
    "--max-total-pixels",
    type=POSITIVE,
    default=2 * 4096 * 4096,
    show_default=True,
    help="All the images of one request together.",
)
@click.option(
    "--fetch-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="Seconds for a whole remote image download.",
)
@click.option(
    "--max-pending",
    type=POSITIVE,
    default=32,
    show_default=True,
    help="Chat requests in at once (queued or running); more are answered 503.",
)
@click.option(
    "--max-connections",
    type=POSITIVE,
    default=64,
    show_default=True,
    help="Connections open at once (one thread each); more are answered 503 and closed.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (from its connection, or a "
    "keep-alive request's first byte); then 408 and the connection is closed.",
)
@click.option(
    "--batch-window-ms",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="How long the worker waits for more requests to batch with the first one.",
)
@click.option(
    "--max-batch-size", type=POSITIVE, default=8, show_default=True, help="Most requests per batch."
)
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
    max_prompt_tokens,
    max_images,
    max_body_bytes,
    max_image_bytes,
    max_image_pixels,
    max_total_pixels,
    fetch_timeout,
    max_pending,
    max_connections,
    header_timeout,
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
        max_total_pixels=max_total_pixels,
        max_images=max_images,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_cap=max_tokens_cap,
        default_max_tokens=min(512, max_tokens_cap),
        allowed_image_dir=allowed_image_dir,
        remote_images=remote_images,
        fetch_timeout=fetch_timeout,
        max_pending=max_pending,
        max_connections=max_connections,
        header_timeout=header_timeout,
    )
    kwargs = image_kwargs(no_image_splitting, longest_edge, max_tiles)
    check_image_kwargs(kwargs)
    try:
        vlm, processor = load(model, adapter_path=adapter_path, dtype=dtype)
        name = model_name(str(model or resolve_model(None, adapter_path)[0]))
        server = create_server(
            vlm, processor, name, host, port, limits, batch_window_ms, max_batch_size, kwargs
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    host, port = server.server_address[:2]
    print(f"Serving {name} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
