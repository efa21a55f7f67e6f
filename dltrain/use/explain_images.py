"""`dltrain explain` for images: where in the image the evidence for the prediction lies,
through Captum's attribution methods.

- integrated_gradients (Sundararajan et al. 2017): the path integral of the gradient from a
  black image (the baseline) to the image; |attribution| summed over channels.
- gradcam (Selvaraju et al. 2017): Captum's LayerGradCam at the last nn.Conv2d, its positive
  part upsampled to the image (LayerAttribution.interpolate). Convolutional models only.
- occlusion (Zeiler & Fergus 2014): how much the score falls when a window of the image is
  blacked out, slid over it (about an eighth of the image a side, half a window a stride).

Each map is scaled to [0, 1] and drawn over the image as the model saw it (resized to its
input size, before normalisation) in a PNG made with matplotlib's Agg backend. The score is the
predicted class's logit (classification) or the predicted value (regression). Models that read
images row by row (data.as_sequence: rows) have no conv layer: Grad-CAM is left out, said.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dltrain.errors import UserError
from dltrain.use.inference import Predictor

METHODS = ("integrated_gradients", "gradcam", "occlusion")
TITLES = {
    "integrated_gradients": "integrated gradients (baseline: black)",
    "gradcam": "Grad-CAM (last conv layer)",
    "occlusion": "occlusion (black windows)",
}
CMAP = "jet"
IG_STEPS = 64


@dataclass
class ImageExplanation:
    """A prediction and its attribution maps (H×W, in [0, 1]) for one image."""

    image: np.ndarray  # H×W×C in [0, 1], as the model saw it (before normalisation)
    predicted: str
    probability: float | None  # classification: the predicted class's; regression: None
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    delta: float | None = None  # integrated gradients' completeness error (Captum's delta)


def explain_image(
    predictor: Predictor, x: torch.Tensor, methods: tuple[str, ...]
) -> ImageExplanation:
    """Attribution maps for the prediction on a one-sample raw batch (1×C×H×W)."""
    scaled = _scaled(x.to(predictor.device))
    target, predicted, probability = _prediction(predictor, x)
    result = ImageExplanation(
        scaled[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy(), predicted, probability
    )
    forward = _forward(predictor)
    if "integrated_gradients" in methods:
        result.maps["integrated_gradients"], result.delta = _integrated_gradients(
            forward, scaled, target
        )
    if "gradcam" in methods:
        conv = last_conv(predictor.model)
        if conv is None:
            _no_conv(predictor, methods, result)
        else:
            result.maps["gradcam"] = _gradcam(forward, conv, scaled, target, result)
    if "occlusion" in methods:
        result.maps["occlusion"] = _occlusion(forward, scaled, target)
    return result


def _prediction(predictor: Predictor, x: torch.Tensor) -> tuple[int, str, float | None]:
    """The output the maps explain: (its index, what it says, its probability)."""
    if predictor.task == "regression":
        value = float(predictor.predict_values(x)[0])
        return 0, f"{predictor.classes[0]} = {value:.4g}", None
    probs = predictor.predict_proba(x)[0]
    target = int(probs.argmax())
    return target, predictor.classes[target], float(probs[target])


def _forward(predictor: Predictor):
    """Scaled pixels in [0, 1] → the model's outputs (the normalisation inside, as trained)."""
    return lambda scaled: predictor.model(predictor.pipeline.eval(scaled))


def _integrated_gradients(forward, scaled: torch.Tensor, target: int) -> tuple[np.ndarray, float]:
    from captum.attr import IntegratedGradients

    with torch.enable_grad():
        attributions, delta = IntegratedGradients(forward).attribute(
            scaled, baselines=torch.zeros_like(scaled), target=target, n_steps=IG_STEPS,
            internal_batch_size=IG_STEPS, return_convergence_delta=True,
        )  # fmt: skip
    return _unit(attributions.abs().sum(dim=1)[0]), float(delta.abs().max())


def _gradcam(forward, conv: nn.Module, scaled, target: int, result: ImageExplanation) -> np.ndarray:
    from captum.attr import LayerAttribution, LayerGradCam

    with torch.enable_grad():
        cam = LayerGradCam(forward, conv).attribute(scaled, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(scaled.shape[-2:]), "bilinear")
    if not (cam > 0).any():
        result.notes.append(
            "Grad-CAM is zero everywhere: the last conv layer holds no positive evidence for "
            "this prediction."
        )
    return _unit(cam[0, 0].detach())


def _occlusion(forward, scaled: torch.Tensor, target: int) -> np.ndarray:
    from captum.attr import Occlusion

    channels, height, width = scaled.shape[1:]
    side = max(1, min(height, width) // 8)
    stride = max(1, side // 2)
    with torch.no_grad():
        attributions = Occlusion(forward).attribute(
            scaled, target=target, sliding_window_shapes=(channels, side, side),
            strides=(channels, stride, stride), baselines=0,
        )  # fmt: skip
    return _unit(attributions.sum(dim=1)[0].clamp(min=0))  # where blacking out cost the score


def _no_conv(predictor: Predictor, methods: tuple[str, ...], result: ImageExplanation) -> None:
    unavailable = (
        "Grad-CAM needs a convolutional model (an nn.Conv2d layer); model "
        f"'{predictor.recipe['model']['name']}' has none"
    )
    if methods == ("gradcam",):
        raise UserError(f"{unavailable}. Use --method integrated_gradients or occlusion.")
    result.notes.append(f"{unavailable}: left out.")


def last_conv(model: nn.Module) -> nn.Module | None:
    """The last nn.Conv2d in module order (registration order), or None."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def render_png(explanation: ImageExplanation, source: str) -> bytes:
    """The input image and each map over it (with a colourbar), titled with the prediction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    panels = len(explanation.maps) + 1
    figure = Figure(figsize=(3.6 * panels + 0.4, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    image = explanation.image
    grey = image.shape[2] == 1
    height, width = image.shape[:2]
    axes = figure.subplots(1, panels, squeeze=False)[0]
    shown = image[..., 0] if grey else image
    axes[0].imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"input ({height}×{width}, as the model sees it)", fontsize=9)
    for ax, (name, saliency) in zip(axes[1:], explanation.maps.items()):
        # Under a map the image is shown in grey, so that the map's colours read unmixed.
        ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(saliency, cmap=CMAP, alpha=0.5, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(TITLES[name], fontsize=9)
        # The colourbar shows the map's colours at full strength (the overlay is half see-through).
        scale = ScalarMappable(norm=Normalize(0, 1), cmap=CMAP)
        figure.colorbar(scale, ax=ax, fraction=0.046, pad=0.04, label="attribution (0–1)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    odds = (
        "" if explanation.probability is None else f" (probability {explanation.probability:.3f})"
    )
    figure.suptitle(f"{source}: predicted {explanation.predicted!r}{odds}", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as training scaled them (uint8 / 255; floats as they are)."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _unit(saliency: torch.Tensor) -> np.ndarray:
    """Scale a map to [0, 1] (all zeros stays zeros)."""
    saliency = saliency.detach().float()
    top = saliency.max()
    if top > 0:
        saliency = saliency / top
    return saliency.clamp(0, 1).cpu().numpy()
