"""Chaos suite: attacks and faults against the real multi-worker server (``python -m app``)."""
