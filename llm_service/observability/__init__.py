"""Observability: every Prometheus collector, the Langfuse tracer and the structlog set-up.

Only observes: imports config and engines' types, never the request path.
"""
