"""The web snippet (pipeline/emit/journey.js) run by Node against a real collector and broker."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.embedded import Service, create_topics, start_kafka
from pipeline.settings import EVENTS_TOPIC
from tests.collector.test_app import WEB_KEY, records, settings_for, started

pytestmark = pytest.mark.services

SNIPPET = Path(__file__).resolve().parents[2] / "pipeline" / "emit" / "journey.js"
NODE = shutil.which("node")

# What a browser provides and Node lacks: storage, the page, its events.
BROWSER = """
const store = {};
globalThis.window = globalThis;
globalThis.localStorage = {
  getItem: (k) => (k in store ? store[k] : null),
  setItem: (k, v) => { store[k] = String(v); },
  removeItem: (k) => { delete store[k]; },
};
globalThis.document = { visibilityState: "visible" };
globalThis.addEventListener = () => {};
"""

PAGE = """
journey.track("page_view", { campaign: "spring" }, { touchpoint: "landing_page" });
journey.identify("cust-web-1");
journey.track("add_to_cart", { sku: "A-100", price: 19.9 }, { touchpoint: "product_page" });
journey.flush();
setTimeout(() => {}, 3000);  // let the fetches finish before Node exits
"""


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with start_kafka(log_dir=tmp_path_factory.mktemp("snippet-kafka")) as service:
        create_topics(service.url, {EVENTS_TOPIC: 2})
        yield service


@pytest.mark.skipif(NODE is None, reason="needs Node.js (apt-get install nodejs)")
async def test_page_events_reach_kafka_with_one_browser_identity(
    kafka: Service, tmp_path: Path
) -> None:
    client = await started(settings_for(kafka.url))
    try:
        url = str(client.make_url("/v1/events"))
        code = SNIPPET.read_text()
        code = code.replace(
            'var COLLECTOR = "https://collector.example.com/v1/events";',
            f"var COLLECTOR = {url!r};",
        ).replace('var KEY = "web-site-key";', f"var KEY = {WEB_KEY!r};")
        assert url in code and WEB_KEY in code, "the snippet's settings lines changed"
        script = tmp_path / "page.js"
        script.write_text(BROWSER + code + PAGE)
        assert NODE is not None
        node = await asyncio.create_subprocess_exec(
            NODE, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(node.communicate(), 30)
        assert node.returncode == 0, err.decode()
        assert b"warn" not in out + err, (out + err).decode()

        found = await records(kafka.url, {"page_view", "identify", "add_to_cart"}, by="event_type")
        events = {e["event_type"]: e for e in (orjson.loads(r.value) for r in found)}
        assert set(events) == {"page_view", "identify", "add_to_cart"}
        assert all(e["source"] == "web" for e in events.values())
        anonymous = {e["anonymous_id"] for e in events.values()}
        assert len(anonymous) == 1  # one browser, one anonymous id
        assert "customer_id" not in events["page_view"]
        assert events["identify"]["customer_id"] == "cust-web-1"
        assert events["add_to_cart"]["customer_id"] == "cust-web-1"
        assert events["add_to_cart"]["properties"] == {"sku": "A-100", "price": 19.9}
    finally:
        await client.close()
