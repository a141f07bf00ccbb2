"""MLflow runs of studies and trials, and the study's report."""
