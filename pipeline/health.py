"""Which services a worker is waiting for now: for /healthz and journey_dependency_up.

The adapters retry a service that is down for as long as it takes (the agent
waits, so consumption stops rather than events piling up in memory); this is
where that wait becomes visible. Only the error's class is kept: messages can
carry host names and, from some clients, URLs, which /healthz must not show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

SERVICES: Final = ("kafka", "redis", "clickhouse")


@dataclass
class Health:
    # service -> (since, error class) while its calls fail
    failing: dict[str, tuple[float, str]] = field(default_factory=dict)

    def failed(self, service: str, exc: BaseException, now: float | None = None) -> None:
        """A call to ``service`` failed and will be retried; the first failure dates the outage."""
        if service not in self.failing:
            self.failing[service] = (time.time() if now is None else now, type(exc).__name__)

    def ok(self, service: str) -> None:
        """A call to ``service`` succeeded: the outage, if any, is over."""
        self.failing.pop(service, None)

    def up(self, service: str) -> bool:
        return service not in self.failing

    def waiting_for(self) -> dict[str, dict[str, Any]]:
        """For /healthz: each failing service, since when and with what kind of error."""
        return {
            service: {"since": since, "error": error}
            for service, (since, error) in sorted(self.failing.items())
        }
