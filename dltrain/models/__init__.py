"""Model factories: each takes the input shape and class count and returns raw-logit modules.

Importing this package registers every model in `dltrain.registry.MODELS`:
`seed_cnn` (the PyTorch tutorial CNN), `mlp`, CIFAR-form `resnet18/34/50`, the
`torchvision:<name>` family of torchvision classification models, and for token ids or float
sequences `rnn`, `lstm`, `gru`, `transformer` and the encoder–decoder `transformer_seq2seq`.
"""

from __future__ import annotations

from dltrain.models import (  # noqa: F401
    cnn,
    mlp,
    resnet,
    rnn,
    torchvision_models,
    transformer,
)
