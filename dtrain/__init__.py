"""dtrain: distributed training with Deep Gradient Compression."""

__version__ = "0.1.0"
