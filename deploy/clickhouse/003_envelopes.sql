-- Events may arrive many to a Kafka message (an envelope, schemas/envelope.v1.json),
-- so a rejected event is known by its message's offset and its index in the
-- envelope (0 for a plain message). The index joins the key: two refused events
-- of one envelope are two rows, and a replayed batch still collapses onto them.
-- Idempotent like 001: applied at every start-up (re-running the ALTER on a table
-- that has the column already changes nothing).

ALTER TABLE journey.rejected_events
    ADD COLUMN IF NOT EXISTS item UInt32 AFTER offset,
    MODIFY ORDER BY (topic, partition, offset, item);
