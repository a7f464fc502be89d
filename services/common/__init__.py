"""Shared plumbing of every Colloquy service: config, logging, gRPC bootstrap, Kafka loop, metrics.

Written once here so each service folder holds only its domain logic, a thin servicer and a
thin Kafka worker.
"""
