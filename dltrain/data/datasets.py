"""Import every dataset family so each registers itself in DATASETS."""

from dltrain.data import digits, files, synthetic, torchvision_sets  # noqa: F401
