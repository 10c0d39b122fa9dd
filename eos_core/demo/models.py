"""The demo's networks, described once and initialised in numpy so that every backend trains the same weights.

* `mlp`: `features -> width -> width -> classes`, tanh activations.
* `cnn` (image datasets): two blocks of a 3x3 convolution with `width` filters (padding 1, tanh)
  and a 2x2 average pool (8x8 -> 4x4 -> 2x2), then a dense layer to the classes (NCHW layout,
  flattened channel-major). Pooling early keeps it cheap: on CPU, torch's convolution backward is
  the cost of a training step here.

Initial weights follow PyTorch's default initialisation of `nn.Linear` / `nn.Conv2d`, weights and biases uniform in
`[-1/sqrt(fan_in), 1/sqrt(fan_in)]`, drawn from `numpy.random.default_rng(seed)` in the order of
[`init_params`][eos_core.demo.models.init_params]. The torch and JAX backends load these arrays, so a run on one
backend and the same run on the other start from identical parameters.

Tanh and the squared error are the demo's defaults because progressive sharpening (Cohen et al. 2021)
is strong and clean with them; on digits, cross-entropy drives the training loss to ~0 within a few
hundred steps and the sharpness then decays instead of reaching 2/lr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARCHITECTURES = ("mlp", "cnn")
LOSSES = ("mse", "ce")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: architecture, sizes and the loss."""

    arch: str = "mlp"
    width: int = 64  #: hidden units of the MLP, or channels of the CNN
    loss: str = "mse"  #: "mse": 0.5 * mean over examples of ||logits - onehot||^2; "ce": cross-entropy

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be an integer >= 1, got {self.width!r}")


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def init_params(spec: ModelSpec, num_features: int, num_classes: int, *, seed: int,
                image_shape: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Initial parameters, float64, in layer order: `[W0, b0, W1, b1, ...]`.

    Dense weights have PyTorch's `(out, in)` layout, convolution kernels `(out, in, 3, 3)`.

    Args:
        spec: the architecture.
        num_features: input features.
        num_classes: output classes.
        seed: seed of the numpy generator (PyTorch's default init distribution).
        image_shape: (height, width) of the inputs, needed by the CNN.

    Returns:
        The parameters.

    Raises:
        ValueError: a CNN without an image shape, or with sides not divisible by 4.
    """
    rng = np.random.default_rng(seed)
    params: list[np.ndarray] = []
    if spec.arch == "mlp":
        sizes = (num_features, spec.width, spec.width, num_classes)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            params += [_uniform(rng, (fan_out, fan_in), fan_in), _uniform(rng, (fan_out,), fan_in)]
        return params
    if image_shape is None:
        raise ValueError("arch='cnn' needs an image dataset (digits); this dataset has no image shape")
    height, width = image_shape
    if height % 4 or width % 4:
        raise ValueError(f"arch='cnn' needs image sides divisible by 4 for its two 2x2 pools, got {image_shape}")
    channels = spec.width
    for fan_in_channels in (1, channels):
        fan_in = fan_in_channels * 9
        params += [_uniform(rng, (channels, fan_in_channels, 3, 3), fan_in), _uniform(rng, (channels,), fan_in)]
    flat = channels * (height // 4) * (width // 4)
    params += [_uniform(rng, (num_classes, flat), flat), _uniform(rng, (num_classes,), flat)]
    return params


def num_params(params: list[np.ndarray]) -> int:
    """The number of scalars in `params`."""
    return int(sum(p.size for p in params))
