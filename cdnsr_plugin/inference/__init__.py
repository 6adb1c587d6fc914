"""Routed inference: tiles (``tiling``), costs (``costs``), decisions (``policies``), the training-free
router (``laplacian``) and the one routed executor (``engine``). See docs/ARCHITECTURE.md."""
