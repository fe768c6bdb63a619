"""A real standalone Milvus server on this machine, without a container: `EmbeddedMilvus`, on the
PyPI package `milvus` (2.3.x, "embedded Milvus": the Milvus binary and its libraries, started as a
child process). For the tests of the server path, the benchmarks, and trying `--uri http://...`
before pointing dmuh at a cluster; it is not a way to run Milvus in production.

    server = EmbeddedMilvus("milvus-data")   # its data, configuration and logs under this folder
    server.start()                           # ~10 s; server.uri: http://127.0.0.1:PORT
    ...
    server.kill()                            # SIGKILL, as a crash
    server.start()                           # the same folder and ports: what was stored is back
    server.stop()

Every port the server listens on (the gRPC proxy, the coordinators and nodes, the embedded etcd's
client and peer ports, the metrics port) is a free port drawn from the kernel at the first start, so
two servers (two test sessions) on one machine do not clash; a restart reuses them, so index files
that name the uri stay valid. Nothing of dmuh is imported here; `milvus` is imported on start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from pathlib import Path
from typing import Dict, Optional

from dmuh.errors import ConfigError

# The keys of the package's config template that name a port (etcd's is its client port).
PORT_KEYS = (
    "etcd_port",
    "root_coord_port",
    "proxy_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)


def free_ports(count: int) -> list:
    """`count` distinct ports no socket of this machine holds now (the kernel's ephemeral ones)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EmbeddedMilvus:
    """One Milvus standalone server process whose files live under `folder` (see the module's docstring)."""

    def __init__(self, folder, start_timeout_s: float = 180.0):
        self.folder = Path(folder).resolve()
        self.start_timeout_s = float(start_timeout_s)
        self.ports: Optional[Dict[str, int]] = None  # drawn at the first start, kept for restarts
        self._server = None

    @property
    def uri(self) -> str:
        if self.ports is None:
            raise ConfigError("the embedded Milvus server was never started; call start() first")
        return f"http://127.0.0.1:{self.ports['proxy_port']}"

    @property
    def pid(self) -> Optional[int]:
        process = getattr(self._server, "server_proc", None)
        return None if process is None else process.pid

    @property
    def running(self) -> bool:
        process = getattr(self._server, "server_proc", None)
        return process is not None and process.poll() is None

    def _etcd_config(self) -> Path:
        """The embedded etcd's own configuration: its client and peer ports (etcd's defaults, 2379
        and 2380, would clash with a second server)."""
        client, peer = self.ports["etcd_port"], self.ports["etcd_peer_port"]
        path = self.folder / "configs" / "etcd.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n"
        )
        return path

    def _template(self, etcd_config: Path) -> Path:
        """The package's config template with `etcd.config.path` set (the template has no key for it)."""
        import milvus  # noqa: PLC0415 - optional: only the embedded server needs it

        text = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text(encoding="utf-8")
        marker = "etcd:\n"
        if marker not in text:
            raise ConfigError("the milvus package's config template has no etcd section; use milvus 2.3.x")
        text = text.replace(marker, f"{marker}  config:\n    path: {etcd_config}\n", 1)
        # A crashed server's node sessions stay in etcd for the session TTL, and a restarted server
        # waits them out before it loads collections again: 30 s by default, 10 s here.
        text = re.sub(r"(session:\n\s+ttl:) 30\b", r"\1 10", text, count=1)
        # The query coordinator's loops (1 s and 0.5 s) set how long loading a collection takes, ~3 s
        # for a small one; 0.2 s and 0.1 s here, for tests that make many small collections.
        text = re.sub(r"(\n  checkInterval:) 1000\b", r"\1 200", text, count=1)
        text = re.sub(r"(\n  distPullInterval:) 500\b", r"\1 100", text, count=1)
        path = self.folder / "configs" / "milvus.yaml.template"
        path.write_text(text, encoding="utf-8")
        return path

    def start(self) -> None:
        """Start the server (and wait until it answers); a stopped or killed one restarts on the
        same folder and ports."""
        try:
            import milvus  # noqa: PLC0415 - optional: only the embedded server needs it
        except ImportError:
            raise ConfigError(
                "the embedded Milvus server needs the milvus package: pip install milvus==2.3.5"
            ) from None
        if self.running:
            return
        self.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.ports is None:
            numbers = free_ports(len(PORT_KEYS) + 2)
            self.ports = dict(zip(PORT_KEYS + ("etcd_peer_port", "metrics_port"), numbers))

        class Config(milvus.MilvusServerConfig):
            def try_bind_port(self, port):
                # A restart finds its ports in TIME_WAIT after a kill; Milvus (Go) binds them with
                # SO_REUSEADDR, so the check here does too.
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        config = Config(template=str(self._template(self._etcd_config())), data_dir=str(self.folder))
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")  # set only without a template
        config.update(**{key: self.ports[key] for key in PORT_KEYS})
        server = milvus.MilvusServer(config)
        server.webservice_port = self.ports["metrics_port"]  # start() searches for a free one from here
        self._server = server
        try:
            server.start()  # it changes the working directory while it starts the process
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise ConfigError(f"the embedded Milvus server in {self.folder} did not start: {error}") from None
        self.ports["metrics_port"] = server.webservice_port

    def kill(self) -> None:
        """SIGKILL the server process, as a crash (nothing flushed, nothing closed)."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self._server.server_proc.wait()
        self.stop()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a second, as the package does)."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()

    def __enter__(self) -> "EmbeddedMilvus":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
