"""The gRPC model server for MNIST digits (``python -m server``)."""
