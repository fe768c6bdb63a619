"""The HTTP face of `dmuh.retrieval.service`: what `dmuh serve` runs (FastAPI on uvicorn).

    POST /search               an image (multipart field `image`, or the raw body as image/*),
                               packed codes or a text (multipart/form fields or JSON), k, rerank
    GET  /                     a page: drop an image, see the ranked thumbnails
    GET  /thumbnail/{id}       a JPEG preview of database image `id` (only from the --images root)
    GET  /healthz, GET /info   liveness; bits, count, model identity, index kind, limits

FastAPI (with Starlette underneath and uvicorn as the server) because it is the most used and
best kept ASGI stack in Python, gives an OpenAPI description of the endpoints for free
(/openapi.json), and runs the blocking search in a thread pool while the event loop keeps
accepting requests. The search itself (the model forward and FAISS) is CPU-bound: it runs in at
most `threads` worker threads, each request under a deadline.

Every bad request gets a 4xx JSON body {"error": "one line"}; an unexpected failure is a 500 of
the same shape, logged as one line, and the server goes on. The request body is counted as it
arrives and refused past `max_upload_bytes` (413), whatever Content-Length claims.
"""

import json
import logging
import math
import re
from importlib import resources
from typing import Any, Dict, Optional

from dmuh.errors import DmuhError, UnavailableError
from dmuh.retrieval.service import SearchService
from dmuh.utils.io import parse_json

log = logging.getLogger("dmuh.serve.app")
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript")}
# The page loads nothing from elsewhere, and nothing it shows can run as script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_FORM_FIELDS = ("codes", "text", "k", "rerank", "depth", "tau", "bit_uncertainty")
# The JSON type of each field: (Python types, as an error names them).
_JSON_TYPES = {
    "codes": ((str, list), "a string or a list of bits"),
    "text": (str, "a string"),
    "rerank": (str, "a string"),
    "k": (int, "an integer"),
    "depth": (int, "an integer"),
    "tau": ((int, float), "a number"),
    "bit_uncertainty": (list, "a list of numbers"),
}
# A connection must send a request's headers within this many seconds of opening (or of its
# previous answer), so that idle or trickling connections (slowloris) cannot hold the service.
HEADER_TIMEOUT_S = 10.0
# Open connections the server keeps; searches beyond `threads` wait for a worker within --timeout.
MAX_CONNECTIONS = 1000


class _TooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware around the whole application: the body limit (by Content-Length, and by
    counting what arrives, for a chunked or lying client), the deadline of every request, the
    security headers, and no exception past this point."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)
        # A body past the limit is read and dropped up to this much (and this long) before the 413,
        # so the client reads the answer instead of a reset; a larger one is cut off.
        self.drain_bytes = max(4 * self.max_bytes, 16 << 20)
        self.drain_s = min(self.timeout_s, 10.0)

    async def __call__(self, scope, receive, send):
        import anyio

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = strict_integer(length.decode("latin-1"), "Content-Length", 0, None)
            except DmuhError as exc:
                return await _send_error(send, 400, str(exc))
            if declared > self.max_bytes:  # read (and drop) what the client sends, so that it sees the 413
                await _drain(receive, self.drain_bytes, self.drain_s)
                return await _send_error(send, 413, self._too_large())
        received = 0
        started = overflowed = False

        async def counted():
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = message.get("more_body", False)
                    raise _TooLarge(self._too_large())
            return message

        async def with_headers(message):
            nonlocal started, overflowed
            if message["type"] == "http.response.start":
                if overflowed:  # the rest of a body past the limit: read before answering, or the client gets a reset
                    overflowed = False
                    await _drain(receive, self.drain_bytes, self.drain_s)
                started = True
                message = {**message, "headers": list(message.get("headers", [])) + _HEADER_PAIRS}
            await send(message)

        try:
            with anyio.fail_after(self.timeout_s):
                await self.app(scope, counted, with_headers)
        except TimeoutError:
            if not started:
                await _send_error(
                    send, 503, f"the request took longer than {self.timeout_s:g} s; try again or ask for less"
                )
        except _TooLarge as exc:  # raised while FastAPI read the body, before any handler ran
            if not started:
                if overflowed:
                    await _drain(receive, self.drain_bytes, self.drain_s)
                await _send_error(send, 413, str(exc))
        except Exception as exc:  # the 500 was sent by the application's handler; keep the server up
            if not started:
                await _send_error(send, 500, f"internal error: {type(exc).__name__}")

    def _too_large(self) -> str:
        return f"request body larger than the {self.max_bytes:,} bytes allowed"


async def _drain(receive, limit: int, seconds: float) -> None:
    """Read and drop the rest of a request body, up to `limit` bytes and `seconds`."""
    import anyio

    dropped = 0
    with anyio.move_on_after(seconds):
        while dropped <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


_HEADER_PAIRS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": without_paths(_one_line(message))}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# An absolute path (two or more parts) in a message: the server's files are not the client's business.
_SERVER_PATH = re.compile(r"(?<![\w.~:/])(?:/[^\s'\"/:,;()]+){2,}")


def without_paths(message: str) -> str:
    """`message` with every absolute server path cut to its last part ("…/name")."""
    return _SERVER_PATH.sub(lambda match: "…/" + match.group(0).rsplit("/", 1)[-1], message)


def _one_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:500] if lines else "bad request"


# Every integer a request carries (k, depth, Content-Length) is ASCII digits, at most this many:
# str.isdigit() also accepts "²" and other digits int() refuses, and int() of thousands of digits
# is slow and refused past 4,300.
INTEGER_DIGITS = 18


def strict_integer(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """The one parser of a request's integer fields: a JSON integer, or text of ASCII digits with
    an optional leading "-", at most INTEGER_DIGITS of them; DmuhError (a 400) otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if not _ASCII_INTEGER.fullmatch(text):
            raise DmuhError(f"{name}={_shown(value)}: expected an integer (ASCII digits, at most {INTEGER_DIGITS})")
        number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise DmuhError(f"{name}={_shown(value)}: expected an integer")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f"from {minimum}" + (f" to {maximum}" if maximum is not None else "")
        raise DmuhError(f"{name}={_shown(number)}: expected an integer {bounds}")
    return number


_ASCII_INTEGER = re.compile(rf"-?[0-9]{{1,{INTEGER_DIGITS}}}")


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value as an error quotes it: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _integer(value, name: str) -> Optional[int]:
    """A form or JSON field that must be an integer (form fields arrive as text); None when absent."""
    if value is None or value == "":
        return None
    return strict_integer(value, name, -(10**INTEGER_DIGITS), 10**INTEGER_DIGITS)


def _number(value, name: str) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (isinstance(value, str) and len(value) > 64):
        raise DmuhError(f"{name}={_shown(value)}: expected a finite number")
    return number


def create_app(service: SearchService, threads: int = 4):
    """The ASGI application serving `service` (thread pool of `threads` for the searches)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    limits = service.limits
    workers = anyio.CapacityLimiter(int(threads))
    app = FastAPI(title="dmuh search", version="1", docs_url=None, redoc_url=None)  # the docs pages load JS from a CDN

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": without_paths(_one_line(message))}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "bad request")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "path", "query"))
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(_TooLarge)
    async def too_large(request, exc):
        return error(413, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug or a case no check foresaw: one line in the log
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, _one_line(exc))
        return error(500, f"internal error: {type(exc).__name__}")

    async def in_worker(function, *args, **kwargs):
        """Run a blocking call in the worker pool; a DmuhError is the client's 400, an
        UnavailableError (the index's Milvus server down or loading) a 503: the same request may
        succeed later, and the next one tries the server again."""
        try:
            return await anyio.to_thread.run_sync(
                lambda: function(*args, **kwargs), limiter=workers, abandon_on_cancel=True
            )
        except UnavailableError as exc:
            raise HTTPException(503, str(exc)) from None
        except DmuhError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", "count": len(service.index)}

    @app.get("/info")
    async def info() -> Dict[str, Any]:
        return service.info()

    for route, (filename, media_type) in PAGE_FILES.items():
        content = resources.files("dmuh.serve").joinpath("static", filename).read_bytes()

        async def page(content=content, media_type=media_type) -> Response:
            return Response(content, media_type=media_type)

        app.add_api_route(route, page, methods=["GET"], include_in_schema=route == "/")

    @app.get("/thumbnail/{item_id}", responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(item_id: str) -> Response:
        try:
            number = strict_integer(item_id, "id", 0, 2**63 - 1)
        except DmuhError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            jpeg = await in_worker(service.thumbnail, number)
        except LookupError as exc:
            raise HTTPException(404, str(exc.args[0] if exc.args else exc)) from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post(
        "/search",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "codes": {"type": "string"},
                                "text": {"type": "string"},
                                "k": {"type": "integer"},
                                "rerank": {"type": "string"},
                            },
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "codes": {"type": "string"},
                                "text": {"type": "string"},
                                "k": {"type": "integer"},
                                "rerank": {"type": "string"},
                                "bit_uncertainty": {"type": "array", "items": {"type": "number"}},
                            },
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )
    async def search(request: Request):
        """One query: an image, packed codes or a text; k and rerank from the body or the query string."""
        fields, image = await _read_query(request)
        try:
            k = _integer(fields.get("k"), "k")
            depth = _integer(fields.get("depth"), "depth")
            tau = _number(fields.get("tau"), "tau")
        except DmuhError as exc:
            raise HTTPException(400, str(exc)) from None
        k = 10 if k is None else k
        rerank = fields.get("rerank") or None
        given = [
            name
            for name, value in (("image", image), ("codes", fields.get("codes")), ("text", fields.get("text")))
            if value not in (None, "")
        ]
        if len(given) != 1:
            raise HTTPException(
                400,
                "give one query: an image, codes or text"
                if not given
                else f"give one query, not {' and '.join(given)}",
            )
        if image is not None:
            return await in_worker(service.search_image, image, k, rerank, depth, tau)
        if fields.get("codes") not in (None, ""):
            uncertainty = fields.get("bit_uncertainty")
            if isinstance(uncertainty, str):
                try:
                    uncertainty = parse_json(uncertainty)
                except ValueError:
                    raise HTTPException(400, "bit_uncertainty: expected a JSON list of numbers") from None
            if uncertainty is not None and (
                not isinstance(uncertainty, list)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in uncertainty)
            ):
                raise HTTPException(400, "bit_uncertainty: expected a list of numbers")
            return await in_worker(service.search_codes, fields["codes"], k, rerank, depth, tau, uncertainty)
        if rerank is not None:
            raise HTTPException(
                400, "rerank applies to image and code queries; text queries are ranked by Hamming distance"
            )
        return await in_worker(service.search_text, fields["text"], k)

    return _Guard(app, limits.max_upload_bytes, limits.timeout_s)


async def _read_query(request):
    """(fields, image bytes or None) of a /search request, by its Content-Type."""
    from starlette.exceptions import HTTPException

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: Dict[str, Any] = {name: request.query_params[name] for name in _FORM_FIELDS if name in request.query_params}
    image = None
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(
                max_files=1, max_fields=len(_FORM_FIELDS) + 1, max_part_size=64 * 1024
            )  # a text field; the image part is a file
        except (HTTPException, _TooLarge):
            raise
        except Exception as exc:  # python-multipart's parse errors: a malformed body
            raise HTTPException(400, f"malformed form body ({_one_line(exc)})") from None
        unknown = sorted(set(form.keys()) - set(_FORM_FIELDS) - {"image"})
        if unknown:
            raise HTTPException(400, f"unknown field {unknown[0]!r} (fields: image, {', '.join(_FORM_FIELDS)})")
        for name in _FORM_FIELDS:
            value = form.get(name)
            if value is not None:
                if not isinstance(value, str):
                    raise HTTPException(400, f"{name}: expected a text field, got a file")
                fields[name] = value
        upload = form.get("image")
        if upload is not None:
            if isinstance(upload, str):
                raise HTTPException(400, "image: expected a file upload (multipart/form-data), got a text field")
            image = await upload.read()
            if not image:
                raise HTTPException(400, "image: the uploaded file is empty")
    elif kind == "application/json":
        try:
            body = parse_json(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "body: not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "body: expected a JSON object")
        unknown = sorted(set(body) - set(_FORM_FIELDS))
        if unknown:
            raise HTTPException(400, f"unknown field {unknown[0]!r} (fields: {', '.join(_FORM_FIELDS)})")
        for name, value in body.items():
            expected = _JSON_TYPES[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, expected[0])):
                raise HTTPException(400, f"{name}: expected {expected[1]}")
        fields.update(body)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        image = await request.body()
        if not image:
            raise HTTPException(400, "body: empty; send the image's bytes")
    else:
        raise HTTPException(
            415,
            f"Content-Type {kind or 'missing'}: send multipart/form-data (an image file), "
            "application/json (codes or text) or the image's bytes as image/*",
        )
    return fields, image


def serve(service: SearchService, sock, threads: int = 4, log_level: str = "warning") -> None:
    """Serve until interrupted, on an already bound socket (so the caller reports a taken port
    itself, and port 0 gives a free one)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(service, threads),
        http=header_timeout_protocol(),
        log_level=log_level,
        access_log=False,
        limit_concurrency=MAX_CONNECTIONS,  # more open connections get a 503
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    `seconds` of opening or of its previous answer (uvicorn itself waits for a head forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request head arrived: the request's own deadline applies now

        def on_response_complete(self) -> None:
            self._arm()  # before: a pipelined request that starts in there disarms it again
            super().on_response_complete()

    return HeaderTimeoutProtocol
