"""Offline training pipeline: MNIST IDX files -> evaluated, versioned SavedModel."""
