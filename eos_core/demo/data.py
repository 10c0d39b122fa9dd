"""The demo's datasets, as standardised numpy arrays (nothing is downloaded).

* `digits`: scikit-learn's `load_digits` (1797 images of 8x8 pixels, 10 classes), which ships
  with scikit-learn.
* `mnist1d`: MNIST-1D generated offline by the `mnist1d` package,
  `make_dataset(get_dataset_args())` (4000 training sequences of 40 features; S. Greydanus and D. Kobak, *Scaling down
  deep learning with MNIST-1D*, ICML 2024), the dataset of the reference figures quoted in
  `benchmarks/README.md`.

Inputs are standardised per feature, `x <- (x - mean) / std`, and features with zero variance
(the always-blank corner pixels of digits) are left at 0. Only the training split is used: the
demo is about the optimisation of the training loss.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist1d")


class MissingDependency(RuntimeError):
    """A package the demo needs is not installed; the message says what to install."""


@dataclass(frozen=True)
class Dataset:
    """A full-batch classification problem."""

    name: str
    x: np.ndarray  #: (n, features) standardised inputs, float64
    y: np.ndarray  #: (n,) integer labels in [0, num_classes)
    num_classes: int
    image_shape: tuple[int, int] | None  #: (height, width) when the features are an image (digits), else None

    @property
    def num_features(self) -> int:
        """The number of input features."""
        return int(self.x.shape[1])

    def one_hot(self) -> np.ndarray:
        """(n, num_classes) one-hot targets for the squared-error loss."""
        return np.eye(self.num_classes)[self.y]


def standardise(x: np.ndarray) -> np.ndarray:
    """Per-feature standardisation `(x - mean) / std`; zero-variance features become 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _import(module: str, install: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{what} needs the '{module.split('.')[0]}' package, which is not installed. "
                                f"Install it with: pip install {install}") from None


def load_dataset(name: str, *, num_samples: int | None = None) -> Dataset:
    """Load a dataset, standardised per feature.

    Args:
        name: one of [`DATASETS`][eos_core.demo.data.DATASETS].
        num_samples: keep the first that many examples (None: all).

    Returns:
        The [`Dataset`][eos_core.demo.data.Dataset].

    Raises:
        ValueError: unknown dataset or `num_samples` < 10.
        MissingDependency: scikit-learn (digits) or mnist1d is not installed.
    """
    if name == "digits":
        datasets = _import("sklearn.datasets", "'eos-core[demo]'", "the digits dataset")
        x, y = datasets.load_digits(return_X_y=True)
        image_shape: tuple[int, int] | None = (8, 8)
    elif name == "mnist1d":
        data = _import("mnist1d.data", "mnist1d", "the mnist1d dataset")
        generated = data.make_dataset(data.get_dataset_args())
        x, y = generated["x"], generated["y"]
        image_shape = None
    else:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if num_samples is not None:
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10, got {num_samples!r}")
        x, y = x[:num_samples], y[:num_samples]
    y = np.asarray(y, dtype=np.int64)
    return Dataset(name=name, x=standardise(x), y=y, num_classes=int(y.max()) + 1, image_shape=image_shape)
