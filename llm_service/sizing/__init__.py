"""Sizing: memory estimates from model configs, the per-slot plan, and the `plan` command."""
