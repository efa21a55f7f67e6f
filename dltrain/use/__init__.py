"""A trained checkpoint put to use without its training code: the model rebuilt for
inference, predictions on files, ONNX/TorchScript export, and saliency explanations."""
