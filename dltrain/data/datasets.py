"""Import every dataset family so each registers itself in DATASETS."""

from dltrain.data import digits, files, sequences, synthetic, text, torchvision_sets  # noqa: F401
