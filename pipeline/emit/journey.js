// Journey tracker: a dependency-free snippet for web pages.
// Queues events and posts them to the collector (POST /v1/events) with fetch,
// or with navigator.sendBeacon when the page is hidden or closing. Set
// COLLECTOR and KEY (the web source's API key: public by nature, it only lets
// someone send events, and the collector rate-limits it), and add the page's
// origin to JOURNEY_COLLECTOR_CORS_ORIGINS. See the README, "Web pages".
(function (window) {
  var COLLECTOR = "https://collector.example.com/v1/events";
  var KEY = "web-site-key";                 // the web source's API key (public by nature)
  var MAX_BATCH = 50, LINGER_MS = 2000, MAX_QUEUE = 1000;
  var queue = [], timer = null, backoff = 1000;

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return [h.slice(0, 8), h.slice(8, 12), h.slice(12, 16), h.slice(16, 20), h.slice(20)].join("-");
  }
  function stored(name, make) {
    try {
      var v = localStorage.getItem(name);
      if (!v && make) { v = make(); localStorage.setItem(name, v); }
      return v;
    } catch (e) { return make ? (window["_" + name] = window["_" + name] || make()) : null; }
  }
  function schedule(ms) { if (!timer) timer = setTimeout(function () { timer = null; flush(false); }, ms); }

  function send(events, unloading) {
    var body = JSON.stringify(events);
    if (unloading && navigator.sendBeacon &&
        navigator.sendBeacon(COLLECTOR + "?key=" + encodeURIComponent(KEY),
                             new Blob([body], { type: "text/plain" }))) return;
    fetch(COLLECTOR, {
      method: "POST", body: body, keepalive: body.length < 60000,
      headers: { "Content-Type": "application/json", "X-Journey-Key": KEY }
    }).then(function (r) {
      if (r.status === 429 || r.status >= 500) return retry(events, r.headers.get("Retry-After"));
      backoff = 1000;
      if (r.status !== 200) console.warn("journey: collector answered", r.status, "- events dropped");
      // 200: rejected events come back in the per-event results; they are never resent.
    }).catch(function () { retry(events, null); });
  }
  function retry(events, after) {               // 429, 5xx, network: back off and resend
    queue = events.concat(queue).slice(0, MAX_QUEUE);
    var wait = after ? Number(after) * 1000 : backoff;
    backoff = Math.min(backoff * 2, 60000);
    schedule(isNaN(wait) ? backoff : wait);
  }
  function flush(unloading) {
    while (queue.length) send(queue.splice(0, MAX_BATCH), unloading);
  }
  function enqueue(eventType, properties, options) {
    options = options || {};
    var event = {
      event_id: uuid(),
      occurred_at: new Date().toISOString(),       // UTC, milliseconds, "Z"
      channel: options.channel || "web",
      event_type: eventType,                        // [a-z][a-z0-9_]{0,63}
      anonymous_id: stored("journey_anon", uuid),
      schema_version: 1
    };
    var customer = options.customer_id || stored("journey_customer");
    if (customer) event.customer_id = customer;
    if (options.touchpoint) event.touchpoint = String(options.touchpoint).slice(0, 128);
    if (properties) event.properties = properties; // flat: strings, numbers, booleans, null
    if (queue.length >= MAX_QUEUE) { console.warn("journey: queue full, event dropped"); return; }
    queue.push(event);
    if (queue.length >= MAX_BATCH) flush(false); else schedule(LINGER_MS);
  }

  window.journey = {
    track: enqueue,
    identify: function (customerId, options) {      // after login: links this browser to the customer
      try { localStorage.setItem("journey_customer", customerId); } catch (e) {}
      options = options || {}; options.customer_id = customerId;
      enqueue("identify", null, options);
    },
    reset: function () {                            // on logout: a new anonymous id, no customer
      try { localStorage.removeItem("journey_customer"); localStorage.removeItem("journey_anon"); } catch (e) {}
    },
    flush: function () { flush(false); }
  };
  window.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flush(true);
  });
  window.addEventListener("pagehide", function () { flush(true); });
})(window);
