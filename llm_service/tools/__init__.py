"""Command-line tools beside the service: the demo checkpoints, the GPU check and `plan`.

The top layer: may import anything; nothing in the service imports them.
"""
