"""sgdnoise: the batch-size x learning-rate x budget study of Smith, Elsen & De (2020)."""

__version__ = "0.1.0"
