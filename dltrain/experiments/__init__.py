"""Many runs of one recipe: k-fold cross-validation, Optuna sweeps and their report, the
learning-rate range test, and comparing finished runs."""
