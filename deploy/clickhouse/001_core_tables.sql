-- Core history tables. ReplacingMergeTree keyed on what identifies a row
-- (event id, transition identity, Kafka position) so that a batch replayed
-- after a crash collapses onto the rows already there; count with FINAL.

CREATE DATABASE IF NOT EXISTS journey;

CREATE TABLE IF NOT EXISTS journey.events
(
    event_id       String,
    occurred_at    DateTime64(3, 'UTC'),
    received_at    DateTime64(3, 'UTC'),
    customer       String,
    customer_id    String,
    anonymous_id   String,
    channel        LowCardinality(String),
    event_type     LowCardinality(String),
    touchpoint     String,
    properties     String,
    source         String,
    schema_version UInt8
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (event_type, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS journey.transitions
(
    journey             LowCardinality(String),
    customer            String,
    from_stage          LowCardinality(String),
    to_stage            LowCardinality(String),
    kind                LowCardinality(String),
    channel             LowCardinality(String),
    event_id            String,
    occurred_at         DateTime64(3, 'UTC'),
    seconds_in_previous Float64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (journey, to_stage, kind, occurred_at, customer, event_id);

CREATE TABLE IF NOT EXISTS journey.rejected_events
(
    received_at DateTime64(3, 'UTC'),
    topic       LowCardinality(String),
    partition   UInt32,
    offset      UInt64,
    code        LowCardinality(String),
    reason      String,
    raw         String
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, offset);
