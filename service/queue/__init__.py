"""The Redis Streams queue: `JobProducer` is the API's side, `JobConsumer` the worker's."""
