"""What a run tells: report.json/.md and the metrics in it, plots, the live progress display,
console tables, the event log (events.jsonl, TensorBoard) and MLflow tracking."""
