"""Routed patch-wise testing: engine, reports, command line (tools/test_patches.py)."""
