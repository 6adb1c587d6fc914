"""Offline builders (kept out of ``data`` as BasicSR keeps its scripts out of its data package): the
difficulty-classified training set (``prepare``), Test2K/4K/8K (``test_sets``), and their helpers."""
