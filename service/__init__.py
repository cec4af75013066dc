"""The serving side: loads a model bundle with onnxruntime and serves it over gRPC.

Never imports torch or export/ (tests/test_boundaries.py checks this).
"""
