"""use/explain*.py: `dltrain explain` through Captum for tables and texts — the columns and the
token that carry the label win, integrated gradients are complete (a row's attributions add up
to its score minus the baseline's), outputs are readable (terminal, JSON, PNG, HTML) — and what
has no single score to attribute is refused. Images: tests/use/test_predict_export_explain.py."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
import yaml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytest.importorskip("captum")


def label_table(path, rows: int, seed: int) -> None:
    """'yes' when a + 2·b > 0: a and b decide, noise and city (a category) carry nothing."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["noise1", "a", "city", "noise2", "b", "label"])
        for _ in range(rows):
            a, b = rng.gauss(0, 1), rng.gauss(0, 1)
            city = rng.choice(["oslo", "rome", "lima"])
            label = "yes" if a + 2 * b > 0 else "no"
            writer.writerow([f"{rng.gauss(0, 1):.4f}", f"{a:.4f}", city, f"{rng.gauss(0, 1):.4f}",
                             f"{b:.4f}", label])  # fmt: skip


def fit(invoke, tmp_path, name: str, data: dict, model: dict, epochs: int) -> str:
    recipe = {
        "name": name, "output": "runs", "device": "cpu", "seed": 0, "data": data,
        "model": model, "optimizer": {"name": "adam", "lr": 0.01}, "train": {"epochs": epochs},
    }  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    fitted = invoke("fit", f"{name}.yaml", "-q")
    assert fitted.exit_code == 0, fitted.output
    return f"runs/{name}/checkpoints/best.pt"


@pytest.fixture
def table_model(tmp_path, invoke):
    label_table(tmp_path / "train.csv", 600, seed=0)
    label_table(tmp_path / "rows.csv", 40, seed=1)
    data = {"name": "csv", "path": "train.csv", "label": "label", "batch_size": 32}
    return fit(invoke, tmp_path, "table", data, {"name": "mlp", "hidden": [32]}, epochs=15)


def test_the_two_columns_that_carry_the_label_get_the_top_attributions(
    table_model, invoke, tmp_path
):
    explained = invoke("explain", table_model, "rows.csv", "--json")
    assert explained.exit_code == 0, explained.output
    result = json.loads(explained.stdout)
    assert list(result["importance"])[:2] == ["b", "a"]  # b weighs twice what a does
    assert len(result["rows"]) == 40 and "training average" in result["baseline"]
    for row in result["rows"]:  # the column that decides most leans the way of the prediction
        assert set(row["attributions"]) == {"noise1", "a", "city", "noise2", "b"}
        top = max(row["attributions"], key=lambda k: abs(row["attributions"][k]))
        assert top in ("a", "b")
    assert (tmp_path / "explain-rows.png").read_bytes()[:8] == PNG_MAGIC


def test_integrated_gradients_are_complete_on_table_rows(table_model, tmp_path):
    """Each row's attributions sum to f(row) − f(baseline) for the predicted class (the
    training average is the baseline), within Captum's own convergence delta."""
    from dltrain.use.explain_tables import explain_rows
    from dltrain.use.inference import load_for_inference
    from dltrain.use.predict import read_input

    predictor = load_for_inference(tmp_path / table_model)
    samples = read_input(tmp_path / "rows.csv", predictor)
    result = explain_rows(predictor, samples)
    with torch.no_grad():
        scores = predictor.model(predictor.preprocess(samples.x.float()))
        base = torch.tensor(predictor.meta["mean"])[None]
        baseline = predictor.model(predictor.preprocess(base))[0]
    gaps = []
    for i, row in enumerate(result.rows):
        target = predictor.classes.index(row["predicted"])
        expected = float(scores[i, target] - baseline[target])
        total = sum(row["attributions"].values())
        assert total == pytest.approx(expected, abs=result.delta + 1e-4)  # Captum's own bound
        gaps.append(abs(expected))
    assert result.delta < 0.01 * max(gaps)  # and that bound is tight: 64 steps suffice


def test_one_row_is_shown_column_by_column_and_charted(table_model, invoke, tmp_path):
    with open(tmp_path / "rows.csv") as f:
        lines = f.read().splitlines()
    (tmp_path / "one.csv").write_text("\n".join(lines[:2]) + "\n")
    explained = invoke("explain", table_model, "one.csv", "-o", "why.png")
    assert explained.exit_code == 0, explained.output
    said = explained.stdout
    assert "one.csv[0]: predicted" in said and "integrated gradients, baseline" in said
    assert said.index(" a ") < said.index("noise1") or said.index(" b ") < said.index("noise1")
    assert (tmp_path / "why.png").read_bytes()[:8] == PNG_MAGIC


def decided_by_one_word(path, rows: int, seed: int) -> None:
    """'pos' when the text holds 'great', 'neg' when it holds 'awful'; filler around it."""
    rng = random.Random(seed)
    filler = ["the", "film", "was", "really", "quite", "plot", "and", "a", "long", "show"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            words = rng.sample(filler, 5) + ["great" if i % 2 else "awful"]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if i % 2 else "neg"])


def test_the_token_that_decides_a_text_wins(tmp_path, invoke):
    decided_by_one_word(tmp_path / "reviews.csv", 300, seed=0)
    data = {"name": "text_csv", "path": "reviews.csv", "batch_size": 32}
    checkpoint = fit(
        invoke, tmp_path, "words", data, {"name": "transformer", "d_model": 32, "heads": 2,
        "layers": 1, "feedforward": 64, "pooling": "mean"}, epochs=8,
    )  # fmt: skip
    texts = ["the plot was great and long", "a really awful film", "quite awful show the plot"]
    args = [a for text in texts for a in ("--text", text)]
    explained = invoke("explain", checkpoint, *args, "--json")
    assert explained.exit_code == 0, explained.output
    result = json.loads(explained.stdout)
    assert [t["predicted"] for t in result["texts"]] == ["pos", "neg", "neg"]
    for text in result["texts"]:
        tokens = dict(text["tokens"])
        decider = "great" if text["predicted"] == "pos" else "awful"
        assert max(tokens, key=lambda k: abs(tokens[k])) == decider and tokens[decider] > 0
    html = (tmp_path / "explain-text.html").read_text()
    assert "<span" in html and "awful" in html

    shown = invoke("explain", checkpoint, "--text", texts[0])
    assert shown.exit_code == 0, shown.output
    assert "predicted pos" in shown.stdout and "great" in shown.stdout


def test_a_method_for_images_or_no_input_is_refused(table_model, invoke):
    """Seq2seq and float-sequence models: tests/use/test_predict_sequences.py."""
    refused = invoke("explain", table_model, "rows.csv", "--method", "gradcam")
    assert refused.exit_code == 2 and "--method gradcam is for images" in refused.output
    missing = invoke("explain", table_model)
    assert missing.exit_code == 2 and "needs an input file" in missing.output
