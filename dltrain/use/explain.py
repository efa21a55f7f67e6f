"""`dltrain explain`: where in an image the evidence for the predicted class lies.

Two saliency maps, each normalised to [0, 1]:

- gradient × input: |∂ score / ∂ pixel × pixel|, summed over channels. The pixels are the
  scaled image in [0, 1] (before normalisation), so a black background, which carries no
  signal, gets no saliency.
- Grad-CAM (Selvaraju et al., 2017), for convolutional models: the last nn.Conv2d's
  activations weighted by their spatially averaged gradients, summed over channels, ReLU'd,
  and upsampled bilinearly to the image size.

`score` is the predicted class's logit. The map is drawn over the image as the model saw it
(resized to its input size) in a PNG made with matplotlib's Agg backend (no pyplot, no display).

Image classifiers only. Models that read images row by row (data.as_sequence: rows) get
gradient × input on the image; they have no conv layer, so Grad-CAM falls back as for any
model without one. Text, sequence, regression and seq2seq models are refused (UserError).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dltrain.errors import UserError
from dltrain.runs.lock import holding_enclosing_run
from dltrain.system.atomic import atomic_write
from dltrain.use.inference import Predictor
from dltrain.use.predict import read_input

METHODS = ("gradxinput", "gradcam", "both")
TITLES = {"gradxinput": "gradient × input", "gradcam": "Grad-CAM"}
CMAP = "jet"


@dataclass
class Explanation:
    """A prediction and its saliency maps (H×W, in [0, 1]) for one image."""

    image: np.ndarray  # H×W×C in [0, 1], as the model saw it (before normalisation)
    predicted: str
    probability: float
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_output(image: Path) -> Path:
    """explain-<image stem>.png in the current folder."""
    return Path(f"explain-{Path(image).stem}.png")


def explain_file(predictor: Predictor, image: Path, method: str = "both") -> Explanation:
    """Read one image (or a one-sample .npy) the way predict does and explain its prediction."""
    if predictor.kind != "image" or predictor.task != "classification":
        what = {"tokens": "text (token ids)", "sequence": "float sequence"}.get(
            predictor.kind, predictor.kind
        )
        task = "" if predictor.task == "classification" else f" {predictor.task}"
        raise UserError(
            f"explain supports image models (classifiers); {predictor.path} holds a {what}"
            f"{task} model (input shape {list(predictor.input_shape)}). Use dltrain predict "
            "for it."
        )
    samples = read_input(Path(image), predictor)
    if len(samples.names) != 1:
        raise UserError(
            f"input {image} holds {len(samples.names)} samples; explain takes one image "
            f"(a .npy array of shape {list(predictor.input_shape)})."
        )
    return explain(predictor, samples.x, method)


def explain(predictor: Predictor, x: torch.Tensor, method: str = "both") -> Explanation:
    """Saliency maps for the predicted class of a one-sample raw batch (1×C×H×W)."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; use one of: {', '.join(METHODS)}.")
    probs = predictor.predict_proba(x)[0]
    target = int(probs.argmax())
    scaled = _scaled(x.to(predictor.device))
    result = Explanation(
        image=scaled[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
        predicted=predictor.classes[target],
        probability=float(probs[target]),
    )
    if method in ("gradxinput", "both"):
        result.maps["gradxinput"] = grad_x_input(predictor, scaled, target)
    if method in ("gradcam", "both"):
        conv = last_conv(predictor.model)
        if conv is None:
            unavailable = (
                f"Grad-CAM needs a convolutional model (an nn.Conv2d layer); model "
                f"'{predictor.recipe['model']['name']}' has none"
            )
            if method == "gradcam":
                raise UserError(f"{unavailable}. Use --method gradxinput.")
            result.notes.append(f"{unavailable}: showing gradient × input only.")
        else:
            cam = grad_cam(predictor, scaled, target, conv)
            if not cam.any():
                result.notes.append(
                    "Grad-CAM is zero everywhere: the last conv layer holds no positive evidence "
                    "for this class."
                )
            result.maps["gradcam"] = cam
    return result


def grad_x_input(predictor: Predictor, scaled: torch.Tensor, target: int) -> np.ndarray:
    """|gradient × input| of the target logit w.r.t. the scaled pixels, summed over channels."""
    x = scaled.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = predictor.model(predictor.pipeline.eval(x))[0, target]
        (grad,) = torch.autograd.grad(score, x)
    saliency = (grad * x).abs().sum(dim=1)[0]
    return _unit(saliency.detach())


def grad_cam(
    predictor: Predictor, scaled: torch.Tensor, target: int, conv: nn.Module
) -> np.ndarray:
    """Grad-CAM at `conv` for the target logit, upsampled to the input's H×W."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["activations"] = output
        # A clone goes on: an in-place op after the conv (ReLU(inplace=True)) must not change
        # the activations kept here.
        return output.clone()

    handle = conv.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = scaled.detach().clone().requires_grad_(True)  # so the graph reaches the conv
            score = predictor.model(predictor.pipeline.eval(x))[0, target]
            (grad,) = torch.autograd.grad(score, captured["activations"])
    finally:
        handle.remove()
    activations = captured["activations"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=scaled.shape[-2:], mode="bilinear", align_corners=False)
    return _unit(cam[0, 0])


def last_conv(model: nn.Module) -> nn.Module | None:
    """The last nn.Conv2d in module order (registration order), or None."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def render_png(explanation: Explanation, source: str) -> bytes:
    """The input image and each map over it (with a colourbar), titled with the prediction."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "explain draws with matplotlib, which is not installed: pip install matplotlib"
        ) from None
    panels = len(explanation.maps) + 1
    figure = Figure(figsize=(3.6 * panels + 0.4, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    image = explanation.image
    grey = image.shape[2] == 1
    shown = image[..., 0] if grey else image
    height, width = image.shape[:2]
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"input ({height}×{width}, as the model sees it)", fontsize=9)
    for ax, (name, saliency) in zip(axes[1:], explanation.maps.items()):
        # Under a map the image is shown in grey, so that the map's colours read unmixed.
        ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(saliency, cmap=CMAP, alpha=0.5, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(TITLES[name], fontsize=9)
        # The colourbar shows the map's colours at full strength (the overlay is half see-through).
        scale = ScalarMappable(norm=Normalize(0, 1), cmap=CMAP)
        figure.colorbar(scale, ax=ax, fraction=0.046, pad=0.04, label="saliency (0–1)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(
        f"{source}: predicted {explanation.predicted!r} "
        f"(probability {explanation.probability:.3f})",
        fontsize=11,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(explanation: Explanation, source: str, output: Path) -> None:
    """Render and write the PNG atomically."""
    png = render_png(explanation, source)
    with holding_enclosing_run(output, "writing a saliency map"):
        atomic_write(Path(output), lambda f: f.write(png))


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as training scaled them (uint8 / 255; floats as they are)."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _unit(saliency: torch.Tensor) -> np.ndarray:
    """Scale a map to [0, 1] (all zeros stays zeros)."""
    saliency = saliency.float()
    top = saliency.max()
    if top > 0:
        saliency = saliency / top
    return saliency.clamp(0, 1).cpu().numpy()
