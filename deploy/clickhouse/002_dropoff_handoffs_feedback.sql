-- Hand-offs and survey answers, and on each exit the last hand-off made in
-- the stage left. Idempotent like 001: applied at every start-up. Keys are a
-- row's identity (journey, customer, the event that caused it), so a batch
-- replayed after a crash collapses onto the rows already there; count with FINAL.

ALTER TABLE journey.transitions ADD COLUMN IF NOT EXISTS handoff_from LowCardinality(String) DEFAULT '';

ALTER TABLE journey.transitions ADD COLUMN IF NOT EXISTS handoff_to LowCardinality(String) DEFAULT '';

-- One row per hand-off and journey: the event on the new channel identifies it.
CREATE TABLE IF NOT EXISTS journey.handoffs
(
    journey      LowCardinality(String),
    customer     String,
    stage        LowCardinality(String),
    from_channel LowCardinality(String),
    to_channel   LowCardinality(String),
    event_id     String,
    occurred_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (journey, occurred_at, customer, event_id);

-- One row per survey answer and journey; stage '' when the customer was in no stage.
CREATE TABLE IF NOT EXISTS journey.feedback
(
    journey     LowCardinality(String),
    stage       LowCardinality(String),
    channel     LowCardinality(String),
    customer    String,
    event_id    String,
    occurred_at DateTime64(3, 'UTC'),
    csat        Nullable(Float64),
    nps         Nullable(Float64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (journey, occurred_at, customer, event_id);
