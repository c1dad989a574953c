"""The response cache: its key, the Redis store with its breaker, the in-process tier in front of it
and the per-request cache controls.

Imports config, observability and engines' types; knows nothing of routes or the registry.
"""
