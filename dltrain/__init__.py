"""dltrain: train and evaluate PyTorch models from YAML recipes."""

__version__ = "0.1.0"
