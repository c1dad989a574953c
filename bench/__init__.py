"""`make bench`: llm-service against `vllm serve`, the bare engine and LiteLLM, one server at a time."""
