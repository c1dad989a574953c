"""llm-service: a multi-model LLM inference service on vLLM."""

__version__ = "1.0.0"
