"""The HTTP collector (`journey collector`): events from systems that hold no Kafka client."""
