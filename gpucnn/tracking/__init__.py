"""Experiment tracking: the Tracker interface the training loop reports to, and its
MLflow implementation (the only module here that talks to MLflow)."""
