"""gpucnn: a convolutional neural network engine from first principles.

The same conv / pool / backprop code runs on NumPy (CPU) and CuPy (GPU); only
:mod:`gpucnn.array.backend` knows which.
"""

from gpucnn.array.backend import Backend, BackendUnavailableError, get_backend, to_host, to_scalar
from gpucnn.nn.layers import (
    AvgPool2D,
    Conv2D,
    Dense,
    Flatten,
    L2Pool2D,
    Logistic,
    MaxPool2D,
    Pool2D,
    ReLU,
    Tanh,
)
from gpucnn.nn.losses import LogisticLogLikelihood, SoftmaxCrossEntropy
from gpucnn.nn.model import Sequential, load_checkpoint, save_checkpoint
from gpucnn.nn.optim import Adam, GradientAscent, Momentum, make_optimizer
from gpucnn.parallel.split import BatchSplit

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AvgPool2D",
    "Backend",
    "BackendUnavailableError",
    "BatchSplit",
    "Conv2D",
    "Dense",
    "Flatten",
    "GradientAscent",
    "L2Pool2D",
    "Logistic",
    "LogisticLogLikelihood",
    "MaxPool2D",
    "Momentum",
    "Pool2D",
    "ReLU",
    "Sequential",
    "SoftmaxCrossEntropy",
    "Tanh",
    "get_backend",
    "load_checkpoint",
    "make_optimizer",
    "save_checkpoint",
    "to_host",
    "to_scalar",
]
