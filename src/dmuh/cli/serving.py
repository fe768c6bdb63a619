"""The `dmuh serve` subcommand: a search service over one index, for a browser and over HTTP
(`dmuh.serve.app` on `dmuh.retrieval.service`; docs/search.md, "dmuh serve")."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys

from dmuh.cli.common import add_run_flag, check_positive
from dmuh.errors import DmuhError
from dmuh.retrieval.options import SERVE_FLAG_LIMITS, ServiceLimits
from dmuh.utils.words import plural

_DEFAULTS = ServiceLimits()


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an index over HTTP: a search page and a JSON API",
        description="Load the model and the index once and answer searches: POST /search (an image, packed "
        "codes or a text), GET / (a page to drop an image on), GET /thumbnail/ID, GET /info, "
        "GET /healthz. Bound to 127.0.0.1 unless --host says otherwise; there is no authentication.",
    )
    p.add_argument(
        "--index", required=True, metavar="INDEX", help="index file written by `dmuh index build` (required)"
    )
    add_run_flag(
        p,
        help="run that encodes query images or texts [default: the run recorded in the index, if it "
        "is still there; else code queries only]",
    )
    p.add_argument(
        "--images",
        metavar="DIR|ZIP",
        help="folder or .zip holding the database images under the paths the index stores, for "
        "thumbnails; nothing outside it is served [default: no thumbnails]",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 or :: for every interface [default: 127.0.0.1]",
    )
    p.add_argument("--port", type=int, default=8000, metavar="N", help="TCP port; 0 picks a free one [default: 8000]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] [default: cpu]")
    p.add_argument(
        "--threads",
        type=int,
        default=4,
        metavar="N",
        help="searches run at once (a request waits for a free one within --timeout) [default: 4]",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=_DEFAULTS.max_upload_bytes / 2**20,
        metavar="MB",
        help=f"largest request body [default: {_DEFAULTS.max_upload_bytes / 2**20:g}]",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=_DEFAULTS.max_image_pixels,
        metavar="N",
        help=f"largest image, width x height, refused before decoding [default: {_DEFAULTS.max_image_pixels:,}]",
    )
    p.add_argument(
        "--max-k",
        type=int,
        default=_DEFAULTS.max_k,
        metavar="N",
        help=f"most results per query (never more than the index holds) [default: {_DEFAULTS.max_k}]",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULTS.timeout_s,
        metavar="S",
        help=f"seconds a request may take before it is answered 503 [default: {_DEFAULTS.timeout_s:g}]",
    )
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="serve even if --run's model is not the one that encoded the index [default: off]",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level: critical, error, warning, info (logs every request) or debug [default: warning]",
    )
    p.set_defaults(func=cmd_serve)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line DmuhError naming the flag."""
    if not 0 <= port <= 65535:
        raise DmuhError(f"--port {port}: expected 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise DmuhError(f"--host {host}: cannot resolve ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(256)
    except OSError as error:
        sock.close()
        reason = "address already in use" if error.errno == errno.EADDRINUSE else error.strerror or str(error)
        raise DmuhError(f"--host {host} --port {port}: cannot listen ({reason})") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    from dmuh.retrieval.service import SearchService

    for value, flag in ((args.threads, "--threads"), (args.max_pixels, "--max-pixels"), (args.max_k, "--max-k")):
        check_positive(value, flag)
    for value, flag in ((args.max_upload_mb, "--max-upload-mb"), (args.timeout, "--timeout")):
        if not value > 0:
            raise DmuhError(f"{flag} {value:g}: expected a positive number")
    for flag, (value, largest) in {
        "--threads": (args.threads, SERVE_FLAG_LIMITS["threads"]),
        "--max-pixels": (args.max_pixels, SERVE_FLAG_LIMITS["max_image_pixels"]),
        "--max-k": (args.max_k, SERVE_FLAG_LIMITS["max_k"]),
        "--max-upload-mb": (args.max_upload_mb, SERVE_FLAG_LIMITS["max_upload_bytes"] / 2**20),
        "--timeout": (args.timeout, SERVE_FLAG_LIMITS["timeout_s"]),
    }.items():
        if not value <= largest:  # inf and nan too
            raise DmuhError(f"{flag} {value:g}: expected at most {largest:g}")
    try:
        import fastapi  # noqa: F401 - only to say what is missing before loading anything
        import uvicorn  # noqa: F401
    except ImportError:
        raise DmuhError("serving needs FastAPI and uvicorn: pip install 'dmuh[serve]'") from None
    limits = ServiceLimits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_image_pixels=args.max_pixels,
        max_k=args.max_k,
        timeout_s=args.timeout,
    )
    service = SearchService.open(
        args.index,
        run=args.run,
        images=args.images,
        device=args.device,
        allow_other_model=args.allow_other_model,
        limits=limits,
    )
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    queries = [kind for kind, on in service.info()["queries"].items() if on]
    print(
        f"serving {args.index} ({service.index.kind}, {plural(len(service.index), 'code')} of "
        f"{plural(service.index.bits, 'bit')}; queries: {', '.join(queries)}"
        f"{'; thumbnails from ' + args.images if args.images else ''}) at http://{shown}:{port}/",
        flush=True,
    )
    if not _is_loopback(args.host):
        print(
            f"note: listening on {args.host}, beyond this machine; the service has no authentication",
            file=sys.stderr,
            flush=True,
        )
    from dmuh.serve.app import serve

    try:
        serve(service, sock, threads=args.threads, log_level=args.log_level)
    finally:
        sock.close()
    return 0
