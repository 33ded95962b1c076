"""Experiment tracking: the Tracker interface the training loop reports to, with the
pictures a tracker logs, and its MLflow implementation in :mod:`.mlflow_store` (the only
module here that talks to MLflow, so it is not imported here).

A tracker of your own subclasses :class:`Tracker` and goes to ``fit(..., tracker=)``.
"""

from gpucnn.tracking.tracker import Tracker, confusion_image, kernel_grid

__all__ = ["Tracker", "confusion_image", "kernel_grid"]
