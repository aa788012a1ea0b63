#!/bin/sh
# The pipeline's Kafka topics, run once per `docker compose up` by the
# kafka-init service. The broker has topic auto-creation off, so a producer or
# worker that names a topic not created here fails loudly instead of writing
# into a new, empty topic.
#
# Idempotent: an existing topic is kept; one with fewer partitions than asked
# for is grown (raise EVENT_PARTITIONS in .env and run
# `docker compose up kafka-init`). Kafka cannot remove partitions, so a topic
# with more is left as it is, with a warning.
#
# journey.transitions gets as many partitions as journey.events: the worker
# owning an events partition publishes that partition's transitions.
set -eu

BOOTSTRAP=${KAFKA_BOOTSTRAP:-kafka:9092}
KAFKA_TOPICS=${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}
REPLICATION=${TOPIC_REPLICATION:-1}
EVENT_PARTITIONS=${EVENT_PARTITIONS:-12}
REJECTED_PARTITIONS=${REJECTED_PARTITIONS:-3}
# Kafka is the only way in: everything downstream is rebuilt by replaying
# journey.events, so it is kept until EVENTS_RETENTION_MS (-1: forever).
EVENTS_RETENTION_MS=${EVENTS_RETENTION_MS:--1}
# Transitions and dead letters are also in ClickHouse: a week to replay from.
DERIVED_RETENTION_MS=${DERIVED_RETENTION_MS:-604800000}

topics() {
  "$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" "$@"
}

ensure_topic() {
  name=$1
  partitions=$2
  retention=$3
  current=$(topics --describe --topic "$name" 2>/dev/null |
    sed -n 's/.*PartitionCount:[[:space:]]*\([0-9][0-9]*\).*/\1/p' | head -n 1)
  if [ -z "$current" ]; then
    echo "creating $name: $partitions partitions, replication $REPLICATION"
    topics --create --if-not-exists --topic "$name" --partitions "$partitions" \
      --replication-factor "$REPLICATION" --config "retention.ms=$retention"
  elif [ "$current" -lt "$partitions" ]; then
    echo "growing $name from $current to $partitions partitions"
    topics --alter --topic "$name" --partitions "$partitions"
  elif [ "$current" -gt "$partitions" ]; then
    echo "warning: $name has $current partitions, more than the $partitions asked for;" \
      "Kafka cannot remove partitions, leaving it" >&2
  else
    echo "$name: $current partitions, as asked"
  fi
}

ensure_topic journey.events "$EVENT_PARTITIONS" "$EVENTS_RETENTION_MS"
ensure_topic journey.transitions "$EVENT_PARTITIONS" "$DERIVED_RETENTION_MS"
ensure_topic journey.events.rejected "$REJECTED_PARTITIONS" "$DERIVED_RETENTION_MS"
