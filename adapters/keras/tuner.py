r"""``CurvatureTuner``: a Keras 3 optimizer that applies a tuning law's learning rate to a wrapped optimizer.

>>> model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)), loss=...)  # doctest: +SKIP
>>> model.fit(x, y, callbacks=[EdgeOfStabilityCallback()])                                        # doctest: +SKIP

Each step is ``w <- w + lr * u`` with ``u`` the wrapped optimizer's update for learning rate 1
(:mod:`.optimizers`) and ``lr`` the law's decision from the statistics it declares (CDAT, eq. 8 of the
CDAT paper: ``lr = sigma * max(-g.u, 0) / (|u^T H u| + eps)``). The statistics are measured with the
active backend's own adapter: :func:`eos_core.adapters.jax.tune` on JAX (:mod:`.jax_engine`; u^T H u by
forward-over-forward differentiation inside the jitted step), the PyTorch adapter's tuner on torch
(:mod:`.torch_engine`; double backward, falling back to finite differences). The loss on the batch that the
probes re-evaluate comes from the model's wrapped ``train_step`` (:mod:`.train_step`, installed by
:func:`~eos_core.adapters.keras.attach` or by the Keras callback).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import keras
import numpy as np

from eos_core import _validation as check
from eos_core import laws as core_laws
from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.keras.optimizers import check_supported
from eos_core.adapters.keras.train_step import JaxBatch, current_batch
from eos_core.laws.base import Law

_OWNER = "CurvatureTuner"
_PRECONDITIONED = frozenset({S.PRECONDITIONED_SHARPNESS, S.PRECONDITIONED_TOP_EIGENVALUES})
_NEEDS_VALUE_FN = frozenset({S.CURVATURE, S.TRIAL_LOSS, S.LOSS}) | S.SPECTRAL


def host_value(value: Any) -> np.ndarray:
    """A backend tensor (torch or JAX) as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def law_config(law: Law) -> dict[str, Any]:
    """A JSON-friendly description of ``law`` (its class and constructor settings)."""
    return {"module": type(law).__module__, "class_name": type(law).__name__, "config": law._settings()}


def law_from_config(config: dict[str, Any]) -> Law:
    """The law :func:`law_config` described."""
    module = importlib.import_module(config.get("module", "eos_core.laws"))
    cls = getattr(module, config["class_name"], None) or getattr(core_laws, config["class_name"])
    if not (isinstance(cls, type) and issubclass(cls, Law)):
        raise ValueError(f"{_OWNER}: {config['class_name']} is not an eos_core law")
    return cls(**config["config"])


def with_initial_lr(law: Law, lr: float) -> Law:
    """``law`` starting from ``lr`` unless it sets its own ``lr_init`` (the PyTorch adapter's rule:
    the law's ``lr_init`` wins over the wrapped optimizer's learning rate)."""
    settings = law._settings()
    if "lr_init" not in settings or settings["lr_init"] is not None:
        return law
    return type(law)(**{**settings, "lr_init": lr})


@keras.saving.register_keras_serializable(package="eos_core")
class CurvatureTuner(keras.optimizers.Optimizer):
    r"""Drive a Keras optimizer with an eos_core tuning law: ``w <- w + lr * u``, ``u`` its update for lr = 1.

    Use it as the model's optimizer and train with ``fit``; the probes need the loss on the current batch,
    which the model's ``train_step`` hands over once it is wrapped: pass
    :class:`eos_core.integrations.keras.EdgeOfStabilityCallback` to ``fit`` (it wraps it and logs the
    diagnostics), or call :func:`eos_core.adapters.keras.attach` on the model yourself::

        model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)),
                      loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=128, epochs=5, callbacks=[EdgeOfStabilityCallback()])

    Laws that need no curvature (``Constant``, ``WarmupCosine``) work without the wrapper.

    Args:
        optimizer: a fresh Keras optimizer (SGD with or without momentum / Nesterov, Adam, AdamW, RMSprop,
            Adagrad, Adamax, Nadam, Adadelta, Lion) with a numeric ``learning_rate``. The tuner takes it over:
            its learning rate is set to 1 (its update is then ``u``) and the law starts from the learning rate
            it had. Gradient clipping and weight decay set on it are honoured (``u`` is formed from the clipped
            gradient and includes ``-weight_decay * w``); ``use_ema``, ``gradient_accumulation_steps`` and
            ``loss_scale_factor`` are refused.
        law: a law from :mod:`eos_core.laws`: ``CDAT``, ``Polyak``, ``Constant``, ``WarmupCosine``, ``Armijo``,
            ``HyperGradient``, ``ExactSharpness``, ``AdaEoS`` (their ``preconditioned=True`` variants on the JAX
            backend with Adam / AdamW / RMSprop). ``DCAO`` is refused: it rewrites the momentum and weight
            decay, which Keras optimizers keep as Python constants compiled into the train step.
        probe_every: measure the law's statistics every ``probe_every`` steps (steps 0, k, 2k, ...) and reuse
            the learning rate in between.
        route: the u^T H u oracle. JAX: ``auto`` (jvp-jvp, then jvp-grad, double-backward, fd-onesided: the
            first that traces), ``jvp-jvp``, ``jvp-grad``, ``double-backward``, ``fd-central``, ``fd-onesided``.
            torch: ``auto`` (double backward, falling back to one-sided finite differences),
            ``double-backward``, ``fd-central``, ``fd-onesided``.
        sharpness_every: every that many steps, estimate lambda_max of the Hessian by warm-started power
            iteration and report ``sharpness``, ``lr_sharpness`` (2 at the edge) and, for Adam / AdamW /
            RMSprop without momentum, ``preconditioned_sharpness``. None: off.
        sharpness_iters, sharpness_tol: power-iteration budget and relative stopping tolerance.
        initial_lr: the learning rate the law starts from; default: the wrapped optimizer's.
        seed: seed of the warm-start vectors (JAX backend; the torch backend's are fixed).
        warn: how skipped steps and law fallbacks are reported (RuntimeWarnings; the counts ``skipped_steps``
            and, on JAX, ``fallback_steps`` are in the diagnostics whatever the setting). ``True`` (default):
            on torch the step warns as it runs. On JAX the jitted step holds no host callback (one costs about
            10% on every step); the warnings are raised on the host by
            :func:`~eos_core.adapters.keras.current_diagnostics`, for every step skipped and every fallback
            since its previous call, and :class:`~eos_core.integrations.keras.EdgeOfStabilityCallback` calls
            it after each batch it logs. The callback, which the curvature laws need anyway, therefore warns at
            the batch where a step was skipped; a ``fit`` without it raises none until
            ``current_diagnostics(model)`` is called (the :attr:`diagnostics` property reports nothing: Keras's
            saving reads it). ``"jit"``: on JAX, warnings from inside
            the jitted step (``jax.debug.callback``, with its per-step cost) without any read; on torch the
            same as True. ``False``: no warnings.
        name: the optimizer's name.

    Bad input (SPEC section 10): a step whose loss or gradient is NaN/Inf is skipped (weights and optimizer
    state unchanged, ``skipped`` = 1, a RuntimeWarning as ``warn`` says) and training continues; a non-finite
    or degenerate curvature keeps the last good learning rate (``fallback`` = 1, a RuntimeWarning: on torch
    for non-finite statistics, on JAX for degenerate ones too). Invalid settings raise ValueError here, naming
    the setting.

    State: everything (law state, counters, warm-start vectors, the wrapped optimizer's slots, the last
    step's diagnostics) lives in Keras variables, so ``model.save`` / ``keras.models.load_model`` and the
    checkpoint callbacks restore it and a resumed run continues the same learning-rate trajectory. The
    ``learning_rate`` variable holds the learning rate the last step applied (writing it has no effect:
    the law decides). Read the diagnostics with :attr:`diagnostics` (after ``fit``) or
    :func:`eos_core.adapters.keras.current_diagnostics` (inside callbacks).
    """

    def __init__(
        self,
        optimizer: Any,
        law: Law,
        *,
        probe_every: int = 1,
        route: str = routes.AUTO,
        sharpness_every: int | None = None,
        sharpness_iters: int = 20,
        sharpness_tol: float = 1e-3,
        initial_lr: float | None = None,
        seed: int = 0,
        warn: bool | str = True,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        check.reject_unknown(_OWNER, kwargs, (
            "optimizer", "law", "probe_every", "route", "sharpness_every", "sharpness_iters", "sharpness_tol",
            "initial_lr", "seed", "warn", "name"))
        backend = keras.backend.backend()
        check_supported(_OWNER, optimizer)
        if not isinstance(law, Law):
            raise ValueError(f"{_OWNER}: law must be an eos_core law (e.g. CDAT(scale=2.0)), got {law!r}")
        if law.decides:
            raise ValueError(
                f"{_OWNER}: {type(law).__name__} decides {', '.join(law.decides)}, which Keras optimizers keep as "
                "Python constants compiled into the train step; the Keras adapter supports learning-rate laws "
                "only (use the PyTorch or JAX adapter for DCAO)")
        unknown = set(law.needs) - set(S.ALL)
        if unknown:
            raise ValueError(f"{_OWNER}: law {law!r} needs statistics this adapter does not know: {sorted(unknown)}")
        probe_every = check.positive_int(_OWNER, "probe_every", probe_every)
        if backend == "torch":
            from eos_core.adapters.keras.torch_engine import SUPPORTED_ROUTES

            route = routes.validate_route(route, owner=f"{_OWNER} (torch backend): route", supported=SUPPORTED_ROUTES)
        else:
            route = routes.validate_route(route, owner=f"{_OWNER}: route")
        if sharpness_every is not None:
            sharpness_every = check.positive_int(_OWNER, "sharpness_every", sharpness_every)
        sharpness_iters = check.positive_int(_OWNER, "sharpness_iters", sharpness_iters)
        sharpness_tol = check.non_negative(_OWNER, "sharpness_tol", sharpness_tol)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{_OWNER}: seed must be an integer, got {seed!r}")
        if not (isinstance(warn, bool | np.bool_) or (isinstance(warn, str) and warn == "jit")):
            raise ValueError(f"{_OWNER}: warn must be True (warnings on the host), 'jit' (JAX: from inside the jitted "
                             f"step) or False (none), got {warn!r}")
        start = float(optimizer._learning_rate.value) if initial_lr is None else initial_lr
        start = check.non_negative(_OWNER, "initial_lr", start)
        law.init(start)  # a law that cannot start raises its ValueError here, at construction
        if law.needs & _PRECONDITIONED:
            self._check_preconditioned(backend, optimizer, law)

        super().__init__(learning_rate=float(start), name=name)
        self.probe_every = probe_every
        self.route = route
        self.sharpness_every = sharpness_every
        self.sharpness_iters = sharpness_iters
        self.sharpness_tol = sharpness_tol
        self.seed = int(seed)
        self.warn: bool | str = "jit" if isinstance(warn, str) else bool(warn)
        self.initial_lr = start
        self.inner_optimizer = optimizer
        optimizer.learning_rate = 1.0
        self.law = law
        if backend == "jax":
            from eos_core.adapters.keras.jax_engine import JaxEngine

            self._engine: Any = JaxEngine(self, with_initial_lr(law, start))
        else:
            from eos_core.adapters.keras.torch_engine import TorchEngine

            self._engine = TorchEngine(self, law)

    @staticmethod
    def _check_preconditioned(backend: str, optimizer: Any, law: Law) -> None:
        name = type(law).__name__
        if backend != "jax":
            raise ValueError(f"{_OWNER}: {name}(preconditioned=True) needs the preconditioned Hessian, which the Keras "
                             "adapter provides on the JAX backend only")
        adaptive = isinstance(optimizer, keras.optimizers.Adam) or (
            isinstance(optimizer, keras.optimizers.RMSprop) and float(optimizer.momentum) == 0.0)
        if not adaptive:
            raise ValueError(f"{_OWNER}: {name}(preconditioned=True) needs an adaptive optimizer with a diagonal "
                             f"preconditioner (Adam, AdamW, RMSprop without momentum), got {type(optimizer).__name__}")

    # -- Keras optimizer protocol ------------------------------------------------------------------
    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._engine.build(var_list)

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    def stateless_apply(self, optimizer_variables: list[Any], grads: list[Any], trainable_variables: list[Any]
                        ) -> tuple[list[Any], list[Any]]:
        if keras.backend.backend() != "jax":
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        if not self.built:
            raise ValueError(f"To call `stateless_apply`, {_OWNER} must be built: optimizer.build(trainable_variables)")
        engine = self._engine
        values = [v.value if isinstance(v, keras.Variable) else v for v in optimizer_variables]
        params = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        own, inner = values[:len(self._variables)], values[len(self._variables):]
        position = {id(v): i for i, v in enumerate(self._variables)}
        state_values = [own[position[id(v)]] for v in engine.state_variables]
        weights, new_state, new_inner, lr = engine.update(state_values, inner, list(grads), params,
                                                          self._value_fn(len(params)))
        weights = [v.constraint(w) if v.constraint is not None else w
                   for v, w in zip(self._trainable_variables, weights, strict=True)]
        new_own = list(own)
        for variable, value in zip(engine.state_variables, new_state, strict=True):
            new_own[position[id(variable)]] = value
        iterations = position[id(self._iterations)]
        new_own[iterations] = own[iterations] + 1
        if isinstance(self._learning_rate, keras.Variable):
            lr_index = position[id(self._learning_rate)]
            new_own[lr_index] = keras.ops.cast(lr, own[lr_index].dtype)
        return weights, new_own + new_inner

    def apply(self, grads: list[Any], trainable_variables: list[Any] | None = None) -> None:
        if not self.built:
            variables = list(trainable_variables) if trainable_variables is not None else None
            if variables is None:
                raise ValueError(f"{_OWNER}: pass trainable_variables to the first apply() (to build the optimizer)")
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        if trainable_variables is not None:
            self._check_variables_are_known(list(trainable_variables))
        if keras.backend.backend() == "jax":
            new_weights, new_values = self.stateless_apply([v.value for v in self.variables], list(grads),
                                                           [v.value for v in self._trainable_variables])
            for variable, value in zip(self._trainable_variables, new_weights, strict=True):
                variable.assign(value)
            for variable, value in zip(self.variables, new_values, strict=True):
                variable.assign(value)
            return
        lr = self._engine.apply(list(grads))
        for variable in self._trainable_variables:
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        self._iterations.assign_add(1)
        if isinstance(self._learning_rate, keras.Variable) and math.isfinite(lr):
            self._learning_rate.assign(lr)

    def _value_fn(self, n_params: int) -> Any:
        batch = current_batch()
        if not isinstance(batch, JaxBatch) or len(batch.trainable) != n_params:
            if self.law.needs & _NEEDS_VALUE_FN or self.sharpness_every is not None:
                raise RuntimeError(self.no_batch_message())
            return None
        return batch.value_fn

    def no_batch_message(self) -> str:
        return (f"{_OWNER}: {type(self.law).__name__} needs the loss on the current batch, but the model's train_step "
                "does not provide it. Pass eos_core.integrations.keras.EdgeOfStabilityCallback() to fit, or call "
                "eos_core.adapters.keras.attach(model) after compile (and again after keras.models.load_model).")

    def load_own_variables(self, store: Any) -> None:
        super().load_own_variables(store)
        self._engine.mark_loaded()

    def set_weights(self, weights: list[Any]) -> None:
        super().set_weights(weights)
        self._engine.mark_loaded()

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        """Nothing to finalise (no EMA of the weights)."""

    # -- reading -----------------------------------------------------------------------------------
    @property
    def diagnostics(self) -> dict[str, Any]:
        """The last step's diagnostics from the variables (outside ``fit`` on JAX; any time on torch).

        A plain read: it reports nothing (Keras's saving visits every attribute of the optimizer, this one
        too). :func:`eos_core.adapters.keras.current_diagnostics` is the read that raises ``warn=True``'s
        warnings on JAX."""
        if not self.built:
            return {}

        def read(variable: Any) -> Any:
            if variable._value is None:
                raise RuntimeError(f"{_OWNER}.diagnostics: the variables are not synced during fit on JAX; inside a "
                                   "callback use eos_core.adapters.keras.current_diagnostics(self.model)")
            return host_value(variable.value)

        return self._engine.decode(read)

    @property
    def lr(self) -> float:
        """The learning rate the last step applied."""
        return float(self.diagnostics.get("lr", self.initial_lr))

    # -- serialisation -----------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "law": law_config(self.law),
            "probe_every": self.probe_every,
            "route": self.route,
            "sharpness_every": self.sharpness_every,
            "sharpness_iters": self.sharpness_iters,
            "sharpness_tol": self.sharpness_tol,
            "initial_lr": self.initial_lr,
            "seed": self.seed,
            "warn": self.warn,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> CurvatureTuner:
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        law = law_from_config(config.pop("law"))
        return cls(optimizer, law, **config)

    def __repr__(self) -> str:
        return (f"CurvatureTuner({type(self.inner_optimizer).__name__}, {self.law!r}, probe_every={self.probe_every}, "
                f"route={self.route!r}, sharpness_every={self.sharpness_every})")
