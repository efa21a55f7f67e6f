"""Training a run: building it from a recipe, the epoch loop, one optimizer step and its parts
(precision, the moving average, the between-step policy), the tasks, evaluation and TTA."""
