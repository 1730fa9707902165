"""Edge deployment: the trained networks exported to ONNX and run by ONNX Runtime
(``compute.runtime: onnxruntime``), optionally quantised to INT8.

``export`` (torch side) writes and checks the exports; ``runtime`` (numpy and
onnxruntime only) runs them.
"""
