"""Using a trained model from its checkpoint alone: `predict`, `export` and `explain`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from dltrain.commands import choices, force_option, imports_option, threads_option

ExportFormat = choices("ExportFormat", "onnx", "torchscript")
ExplainMethod = choices("ExplainMethod", "all", "integrated_gradients", "gradcam", "occlusion")


def predict(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    inputs: list[Path] = typer.Argument(
        None,
        help="Image files (png/jpg/jpeg/bmp/gif/webp) or .npy arrays for image models; .csv "
        "tables or .npy arrays for tabular models; .npy arrays for sequence models; .txt files "
        "(one text per line) or .csv tables (the text column) for text models.",
        show_default=False,
    ),
    texts: list[str] = typer.Option(
        None,
        "--text",
        "-t",
        metavar="TEXT",
        help="A text to predict, for text models (repeatable; predicted after the files).",
        show_default=False,
    ),
    top_k: int = typer.Option(
        None,
        "--top-k",
        "-k",
        min=1,
        help="Classes to show per input (default: 5, or all if fewer). Classification only.",
    ),
    device: str = typer.Option("cpu", "--device", help="Device to run the model on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON array to stdout."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Also write the predictions to a .csv (one row per input) or .jsonl file.",
        show_default=False,
    ),
    force: bool = force_option(),
    imports: list[str] = imports_option(),
    threads: str = threads_option("auto"),
) -> None:
    """Predict from files or texts, prepared as in training, from the checkpoint alone.

    Images of any size: converted to the model's channels, resized (bilinear) to its input.
    .npy arrays: one sample or a batch; uint8 = pixels (scaled by 1/255), floats as they are.
    .csv tables (tabular models): one sample per row, encoded as in training (empty cells and
    categories never seen in training are fine); the label column is ignored.
    Text models: --text "..." or .txt/.csv files, encoded with the checkpoint's vocabulary.
    Classifiers print the top classes, regression models the value, seq2seq models the
    decoded output sequence.

    [bold]Examples[/]

      dltrain predict runs/quickstart/checkpoints/best.pt digit.png other.jpg

      dltrain predict best.pt batch.npy --top-k 3 --json

      dltrain predict best.pt photos/*.jpg --output predictions.csv

      dltrain predict runs/sms/checkpoints/best.pt --text "free prize, call now" messages.txt

      dltrain predict runs/reverse/checkpoints/best.pt --text 3071
    """
    from dltrain.reporting.console_tables import outputs_table, predictions_table, top_classes_table
    from dltrain.runs.outputs import refuse_replacing_run_files
    from dltrain.system.out_of_memory import out_of_memory_is_a_run_failure
    from dltrain.system.threads import parse_threads
    from dltrain.use.inference import load_for_inference
    from dltrain.use.predict import check_predictions_path, predict_files, write_predictions

    console = Console(stderr=True) if as_json else Console()
    threads = parse_threads(threads or "auto", "--threads")
    if output is not None:
        check_predictions_path(output)
        refuse_replacing_run_files(output, force, source=checkpoint)
    with out_of_memory_is_a_run_failure(device):
        predictor = load_for_inference(checkpoint, device, imports or [])
        results, choice = predict_files(predictor, inputs or [], top_k, texts or [], threads)
    if choice.step_ms:  # timed: many inputs; said apart from the predictions
        Console(stderr=True).print(choice.describe(), style="dim", markup=False)
    if output is not None:
        write_predictions(output, results)
        Console(stderr=True).print(f"wrote {len(results):,} predictions to {output}", markup=False)
        if not as_json:
            return  # the file holds them: thousands of rows are not for the terminal
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    elif predictor.task == "regression":
        target = predictor.classes[0] if predictor.classes else "value"
        console.print(outputs_table(results, "prediction", f"predicted {target}"))
    elif predictor.task == "seq2seq":
        console.print(outputs_table(results, "output", "output"))
    elif len(results) == 1:
        console.print(predictions_table(results[0]))
    else:  # many inputs: one table, a row each
        console.print(top_classes_table(results))


def export(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    format: ExportFormat = typer.Option(
        ..., "--format", "-f", help="onnx or torchscript.", show_default=False
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="File to write (default: beside the checkpoint: best.onnx, best.torchscript.pt).",
    ),
    imports: list[str] = imports_option(),
    force: bool = force_option(),
) -> None:
    """Export a checkpoint's model to ONNX or TorchScript, for use without dltrain.

    The file maps a preprocessed float32 batch (N × input shape) to logits (regression: the
    predicted values). Preprocessing is not in the graph; the file's metadata (dltrain.json)
    says it: x = uint8/255 for images, then (x - mean) / std per channel or feature.
    Text models take int64 token ids; the metadata holds the vocabulary and tokenizer.
    It also holds the class names and the input shape.
    Seq2seq models decode step by step and are not exported (use dltrain predict); recurrent
    models over token ids export to TorchScript only.
    ONNX export needs: pip install onnx onnxscript

    [bold]Examples[/]

      dltrain export runs/quickstart/checkpoints/best.pt --format onnx

      dltrain export best.pt --format torchscript --output model.pt
    """
    from dltrain.use.export import export_checkpoint, summary

    written, predictor = export_checkpoint(checkpoint, format.value, output, imports or [], force)
    Console().print(
        f"exported {format.value} to {escape(str(written))} · {escape(summary(predictor))}",
        highlight=False,
        soft_wrap=True,
    )


def explain(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    source: Path = typer.Argument(
        None,
        help="An image (or a one-sample .npy) for image models; a .csv of rows for table "
        "models; a .txt (one text a line) or .csv for text models.",
        show_default=False,
    ),
    texts: list[str] = typer.Option(
        None,
        "--text",
        "-t",
        metavar="TEXT",
        help="A text to explain (text models; repeatable).",
        show_default=False,
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="File to write: a PNG for images and tables, an HTML page for texts (default: "
        "./explain-<input stem>.png or .html).",
    ),
    method: ExplainMethod = typer.Option(
        ExplainMethod("all"),
        "--method",
        help="Images: integrated_gradients, gradcam (Grad-CAM at the last conv layer), "
        "occlusion, or all. Tables and texts: integrated gradients.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the attributions as JSON."),
    imports: list[str] = imports_option(),
    force: bool = force_option(),
) -> None:
    """Show what drove a prediction, from the checkpoint alone (Captum): attribution maps
    over an image, each column's attribution for table rows (their importance over many),
    each token's for a text.

    [bold]Examples[/]

      dltrain explain runs/quickstart/checkpoints/best.pt digit.png

      dltrain explain best.pt cat.jpg --method gradcam --output cat-gradcam.png

      dltrain explain runs/table/checkpoints/best.pt rows.csv --json

      dltrain explain runs/sms/checkpoints/best.pt --text "WIN a free prize now"
    """
    from dltrain.runs.outputs import refuse_replacing_run_files
    from dltrain.use.explain import default_output, read_samples
    from dltrain.use.explain_show import show_explanation
    from dltrain.use.inference import load_for_inference

    if output is not None:  # said before anything is read
        refuse_replacing_run_files(output, force, source=checkpoint)
    predictor = load_for_inference(checkpoint, imports=imports or [])
    samples, stem = read_samples(predictor, source, texts)
    target = output or default_output(stem, predictor.kind)  # .png or .html: by the model
    if output is None:
        refuse_replacing_run_files(target, force, source=checkpoint)
    show_explanation(predictor, samples, method.value, target, as_json, Console())
