"""A ClickHouse HTTP endpoint in front of chDB, for the benchmarks: ClickHouse over the network.

Run by bench/throughput.py, or by hand:

    .venv/bin/python bench/clickhouse_http.py --data DIR --port 8123

In production the worker writes to a ClickHouse server (`JOURNEY_CLICKHOUSE_DSN`
``http://…``): the inserts' parsing, part writing and merges happen on that
server's cores, and any number of workers insert. The embedded default
(``chdb://``) runs that engine inside the one worker that owns it. No
ClickHouse server binary is available on this machine (not in Debian, not on
PyPI), so this answers the subset of ClickHouse's HTTP interface that
clickhouse-connect uses (queries and commands with the SQL in the ``query``
parameter and/or the body, inserts with their data in the body, compressed
bodies, ``Code: N. DB::Exception`` errors with ``X-ClickHouse-Exception-Code``)
by running each request's SQL on chDB in this process. That lets the
benchmark run the worker as it runs in production, in a process of its own
beside the engine, and run several workers against one ClickHouse.

It is a stand-in for measurement, not a server: no users, no settings, no
sessions, one query at a time (chDB's engine is itself multi-threaded), and
no multipart form bodies (clickhouse-connect sends one only for bind
parameters over 4 KB; they are refused with an error that says so).
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.embedded import Service, free_port, wait_for_port

# ClickHouse answers a failed statement with its error code in this header.
_CODE = re.compile(r"Code: (\d+)")


def decompress(body: bytes, encoding: str | None) -> bytes:
    """A request body as clickhouse-connect may compress it (``Content-Encoding``)."""
    if not encoding or encoding == "identity":
        return body
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.decompress(body))
    if encoding == "zstd":
        from backports import zstd

        return bytes(zstd.decompress(body))
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def statement(params: dict[str, list[str]], body: bytes) -> bytes:
    """The SQL of a request: the ``query`` parameter, then the body (an insert's data)."""
    query = params.get("query", [""])[0].encode()
    if query and body:
        return query + b"\n" + body
    return query or body


def bound(params: dict[str, list[str]]) -> dict[str, str]:
    """A parameterised query's values: ClickHouse takes them as ``param_<name>`` in the URL."""
    return {k.removeprefix("param_"): v[0] for k, v in params.items() if k.startswith("param_")}


class ChdbHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], data_dir: Path) -> None:
        import chdb.session

        super().__init__(address, Handler)
        session: Any = chdb.session.Session  # untyped in chdb
        self.session = session(str(data_dir))
        self.lock = threading.Lock()  # one statement at a time on the one session

    def run(self, sql: bytes, params: dict[str, str] | None = None) -> bytes:
        """``params``: a parameterised query's values (``{name:Type}`` in the SQL)."""
        with self.lock:
            # ClickHouse's default over HTTP; a FORMAT clause in the SQL wins, as there.
            text = sql.decode("utf-8", errors="surrogateescape")
            result = self.session.query(text, "TSV", params=params or None)
        return bytes(result.bytes())


class Handler(BaseHTTPRequestHandler):
    server: ChdbHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as clickhouse-connect's pool expects

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a benchmark's thousands of inserts are not worth a line each."""

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self._answer(body)

    def _answer(self, body: bytes) -> None:
        url = urlsplit(self.path)
        if url.path in ("/ping", "/"):
            params = parse_qs(url.query, keep_blank_values=True)
            if url.path == "/ping" or not (params.get("query") or body):
                self._send(200, b"Ok.\n")
                return
        else:
            self._send(404, b"not found\n")
            return
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            message = b"Code: 1001. DB::Exception: multipart form bodies are not supported here\n"
            self._send(500, message, {"X-ClickHouse-Exception-Code": "1001"})
            return
        try:
            sql = statement(params, decompress(body, self.headers.get("Content-Encoding")))
            out = self.server.run(sql, bound(params))
        except Exception as exc:  # every failure goes back as ClickHouse's would
            text = str(exc)
            match = _CODE.search(text)
            code = match.group(1) if match else "1001"
            error = text if match else f"Code: {code}. DB::Exception: {text}"
            self._send(500, error.encode() + b"\n", {"X-ClickHouse-Exception-Code": code})
            return
        self._send(200, out)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def start(data_dir: Path, log_dir: Path, timeout: float = 60.0) -> Service:
    """Start the endpoint as a child process; return once it accepts connections."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "clickhouse-http.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--data", str(data_dir), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service("clickhouse", process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_port(
            "127.0.0.1",
            port,
            timeout,
            service="ClickHouse HTTP",
            process=process,
            log_path=log_path,
        )
    except BaseException:
        service.stop()
        raise
    return service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="chDB data directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    server = ChdbHTTPServer((args.host, args.port), args.data)
    print(f"ClickHouse HTTP on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
