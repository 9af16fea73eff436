"""Multirun sweeps and Optuna searches as groups of MLflow runs."""
