"""Analyses of trained routed networks (``tools/analyze_routing.py``)."""
