"""The Kafka edge: client configuration and checks, start-up diagnosis, topics, TLS, record conversion."""
