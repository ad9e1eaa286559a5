"""Experiments built on the engine: named recipes (and, later, the reproduction runner)."""
