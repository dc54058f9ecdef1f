"""deploykit: train, compress, export, serve and validate PyTorch models from one YAML pipeline."""

__version__ = "0.1.0"
