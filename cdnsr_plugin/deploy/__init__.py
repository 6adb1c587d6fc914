"""Deployment: ONNX export and runtime of routed networks (``onnx_export``, ``onnx_runtime``), and import of
official ClassSR / CDNSR checkpoints (``convert``)."""
