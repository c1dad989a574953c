"""Inference engines: the protocol, the vLLM implementation and a fake for tests."""
