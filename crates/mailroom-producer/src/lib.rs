//! The mailroom producer: validates, seals and publishes jobs to RabbitMQ with publisher confirms, and serves the HTTP API.
