"""Sizing: memory estimates from model configs and the per-slot plan (the `plan` command: tools/plan.py).

Imports engines' types only: configuration uses it, it knows nothing of settings."""
