"""The Optuna side of a study: creating it, the objective, samplers and pruners, workers."""
