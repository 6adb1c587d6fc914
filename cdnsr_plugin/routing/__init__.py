"""Routing utilities: patch decomposition/merging and FLOPs accounting."""
