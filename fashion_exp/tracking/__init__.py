"""MLflow: where runs go, what one run records (live or through its outbox), logged models,
links into the MLflow UI."""
