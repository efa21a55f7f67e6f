"""Model factories: each takes the input shape and class count and returns raw-logit modules.

Importing this package registers every model in `dltrain.registry.MODELS`:
`seed_cnn` (the PyTorch tutorial CNN), `mlp`, CIFAR-form `resnet18/34/50`, and the
`torchvision:<name>` family of torchvision classification models.
"""

from __future__ import annotations

from dltrain.models import cnn, mlp, resnet, torchvision_models  # noqa: F401
