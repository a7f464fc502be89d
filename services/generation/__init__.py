"""Generation: the model on Ray Serve (engine, Serve deployment, Kafka worker); see README.md."""
