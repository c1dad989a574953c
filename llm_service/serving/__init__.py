"""The request's way through the service below HTTP: generation (with coalescing and images),
embeddings, rerank and what they share (retrieval).

Imports the registry, cache, traffic, observability and errors; never the web framework.
"""
