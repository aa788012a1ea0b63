"""A periodic round trip to the Kafka cluster, so an idle worker notices a lost broker.

Faust does not surface fetch failures, and publishing (pipeline.processor) is
the only other place that reports Kafka: a worker that receives nothing would
stay "healthy" while cut off. The worker runs :meth:`KafkaProbe.check` every
few seconds (:class:`KafkaProbeService`); a failure puts ``kafka`` in /healthz's
``waiting_for`` and sets ``journey_dependency_up{service="kafka"}`` to 0.

The probe runs from the moment the app starts, as a child service of the app,
not as an ``@app.timer``: Faust starts its timers only once table recovery is
done, that is after the first partition assignment, while the agent (and with
it /healthz's "ok") starts before. A worker that lost the broker during its
first group join, or never reached it, would never be probed.

What a probe does: a Metadata request for no topics (a few bytes each way) to a
broker at its *advertised* address, over one connection kept open between
probes. Bootstrapping alone would not do: the bootstrap address can answer
while the advertised listeners, which the worker's consumer and producer use,
do not. The client's cached cluster metadata is never taken as an answer. Any
broker answering counts, as for the worker's own clients: one broker of
several being down is the cluster's business (replication), and publishing
reports it if it stops writes. So the probe asks the broker that answered last
time first (one connection, not one per broker), and gives each broker half
the timeout: a broker whose host is gone (connects hang rather than being
refused) leaves time to ask another one in the same probe, instead of failing
the probe whenever it happens to be asked. After a failure the client is
dropped, and the next probe bootstraps afresh, so brokers that came back at
new addresses are found. Same bootstrap servers and authentication as every
other client of the project; credentials are never logged (only the error's
class and host:port).

Who clears a failure: the probe clears only an outage it reported itself.
A failure that publishing reported stays until publishing succeeds: a publish
can fail while the broker answers metadata (acks=all with too few in-sync
replicas, a partition without a leader, a topic ACL), and the worker is then
just as stuck. Were the probe to clear it, /healthz and the gauge would turn
"up" every probe interval while the publish waits out its back-off (up to
``retry_max_seconds``, 30 s by default) and fails again, restarting the
outage's ``since`` each time: an alert with a ``for:`` clause would never fire.
Publishing retries until it succeeds and then reports ``ok`` itself, so no
failure it reports is left standing. The one blip left: when both reported the
same outage, the probe's success clears it once, and a publish that still
fails re-reports it at its next attempt; from then on the failure is
publishing's, and the probe leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from mode import Service

from pipeline.health import Health
from pipeline.producer import bootstrap_servers, client_options
from pipeline.settings import Settings

log = logging.getLogger(__name__)

SERVICE: Final = "kafka"
# /healthz must say "waiting_for kafka" within ~15 s of losing the broker:
# worst case one interval until the next probe plus one timeout.
PROBE_INTERVAL_SECONDS: Final = 5.0
# A metadata round trip on a healthy cluster takes milliseconds; 3 s leaves room
# for a loaded broker or a TLS and SASL handshake, and ends before the next probe.
PROBE_TIMEOUT_SECONDS: Final = 3.0
CLIENT_ID: Final = "journey-kafka-probe"
# The errors of a broker that does not answer (refused, reset, timed out, not ready).
UNREACHABLE: Final = (KafkaError, OSError, TimeoutError)


@dataclass
class ProbeReport:
    """How probe outcomes reach :class:`Health` (the rule is in the module docstring)."""

    health: Health
    # True from a probe that failed until the next that succeeds (whatever cleared Health).
    reported: bool = False

    def failed(self, exc: BaseException, now: float | None = None) -> bool:
        """The broker did not answer; True if that is news to the probe (log it once)."""
        # Publishing may have ended the outage the probe reported, so ask Health too.
        news = not self.reported or self.health.up(SERVICE)
        self.health.failed(SERVICE, exc, now)
        self.reported = True
        return news

    def answered(self) -> bool:
        """The broker answered; True if the probe had reported it lost (log its return once).

        A publish may have cleared the outage first; then this changes nothing in Health.
        """
        if not self.reported:
            return False
        self.reported = False
        self.health.ok(SERVICE)
        return True


def probe_order(nodes: Sequence[int], last: int | None, rng: random.Random) -> list[int]:
    """The broker that answered last first, then the others in random order."""
    rest = [node for node in nodes if node != last]
    rng.shuffle(rest)
    return [last, *rest] if last is not None and last in nodes else rest


class KafkaProbe:
    """Asks the cluster for metadata on each :meth:`check`; reports to ``health``.

    Create it anywhere; the client is built inside the event loop on the first check.
    """

    def __init__(
        self,
        health: Health,
        servers: str,
        options: dict[str, Any],
        timeout: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        self.report = ProbeReport(health)
        self.servers = servers
        self.timeout = timeout
        self._options = options  # may hold a SASL password: never log it
        self._client: Any = None
        self._closed = False
        self._last_node: int | None = None
        self._rng = random.Random()

    @classmethod
    def for_settings(cls, settings: Settings, health: Health) -> KafkaProbe:
        return cls(
            health, bootstrap_servers(settings.kafka_url), client_options(settings.kafka_auth)
        )

    async def check(self) -> bool | None:
        """One probe: True if the broker answered, False if not, None once closed.

        Never raises (it runs on the worker's timer): an error that is not the
        broker's is logged and the probe retried next time, Health untouched.
        """
        if self._closed:
            return None
        try:
            await asyncio.wait_for(self._round_trip(), self.timeout)
        except UNREACHABLE as exc:
            await self._drop_client()
            if self.report.failed(exc):
                log.warning(
                    "Kafka at %s does not answer (%s); /healthz waits for it until it does",
                    self.servers,
                    type(exc).__name__,
                )
            return False
        except Exception:
            await self._drop_client()
            log.exception("Kafka probe failed unexpectedly; the next one retries")
            return None
        if self.report.answered():
            log.info("Kafka at %s answers again", self.servers)
        return True

    async def close(self) -> None:
        """Close the connection; later checks do nothing (the worker is stopping)."""
        self._closed = True
        await self._drop_client()

    async def _round_trip(self) -> None:
        # Half the timeout per broker (or bootstrap host): time to ask a second one.
        attempt = self.timeout / 2
        if self._client is None:
            client = AIOKafkaClient(
                bootstrap_servers=self.servers,
                client_id=CLIENT_ID,
                request_timeout_ms=int(attempt * 1000),
                **self._options,
            )
            self._client = client
            await client.bootstrap()
        client = self._client
        nodes = [broker.nodeId for broker in client.cluster.brokers()]
        if not nodes:
            raise KafkaError("the cluster's metadata lists no broker")
        error: BaseException | None = None
        for node in probe_order(nodes, self._last_node, self._rng):
            try:
                # An empty topic list (Metadata v1 and later): brokers and controller only.
                await asyncio.wait_for(client.send(node, MetadataRequest([])), attempt)
            except UNREACHABLE as exc:
                error = exc
                continue
            self._last_node = node
            return
        assert error is not None
        raise error

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # a broken connection can fail to close; it is gone anyway
                log.debug("closing the Kafka probe's client failed: %s", type(exc).__name__)


class KafkaProbeService(Service):
    """Runs :meth:`KafkaProbe.check` now and every interval while the app runs.

    Add it with ``app.add_dependency``: it starts and stops with the app.
    """

    def __init__(self, probe: KafkaProbe, **kwargs: Any) -> None:
        self.probe = probe
        super().__init__(**kwargs)

    @Service.timer(PROBE_INTERVAL_SECONDS, exec_first=True)
    async def _probe(self) -> None:
        await self.probe.check()

    async def on_stop(self) -> None:
        """The worker is stopping: close the probe's connection."""
        await self.probe.close()
