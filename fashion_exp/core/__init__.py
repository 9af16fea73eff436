"""The experiment core: data, models, optimizers, the Keras training loop, metrics and figures.

It knows nothing of MLflow: what a run records is handed in from outside (a callable that
takes each epoch's metrics), so these modules import neither mlflow nor fashion_exp.tracking.
"""
