"""Model factories: each takes the input shape and class count and returns raw-logit modules.

Each module registers its models in `dltrain.config.registry.MODELS`, which imports them on
its first lookup (its `modules` list names them):
`seed_cnn` (the PyTorch tutorial CNN), `mlp`, CIFAR-form `resnet18/34/50`, `speednet` (a
fast CIFAR net with a whitened stem), the
`torchvision:<name>` family of torchvision classification models, and for token ids or float
sequences `rnn`, `lstm`, `gru`, `transformer` and the encoder–decoder `transformer_seq2seq`.
"""
