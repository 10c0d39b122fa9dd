r"""`CurvatureTuner`: a Keras 3 optimizer that applies a tuning law's learning rate to a wrapped optimizer.

```python
model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)), loss=...)
model.fit(x, y, callbacks=[EdgeOfStabilityCallback()])
```

Each step is $w \leftarrow w + \eta u$ with $u$ the wrapped optimizer's update for learning rate 1
(`eos_core.adapters.keras.optimizers`) and $\eta$ the law's decision from the statistics it declares (CDAT, eq. 8 of
the CDAT paper, Roulet et al. 2024: $\eta = \sigma \max(-g^\top u, 0) / (|u^\top H u| + \varepsilon)$). The
statistics are measured with the active backend's own adapter: [`eos_core.adapters.jax.tune`][] on JAX
(`eos_core.adapters.keras.jax_engine`; $u^\top H u$ by forward-over-forward differentiation inside the jitted step),
the PyTorch adapter's tuner on torch (`eos_core.adapters.keras.torch_engine`; double backward, falling back to
finite differences). The loss on the batch that the probes re-evaluate comes from the model's wrapped `train_step`
(`eos_core.adapters.keras.train_step`, installed by [`attach`][eos_core.adapters.keras.attach] or by the Keras
callback).

Saved models name their law by class; `law_from_config` resolves that name among the eos_core laws
and the classes registered with Keras (`keras.saving.register_keras_serializable` or `custom_objects`),
and never imports a module a file names, so `keras.models.load_model`'s `safe_mode` keeps its meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from eos_core import _validation as check
from eos_core import laws as core_laws
from eos_core import routes
from eos_core import stats as S
from eos_core.adapters.keras.optimizers import check_supported, current_lr, is_variable
from eos_core.adapters.keras.optimizers import edge as optimizer_edge
from eos_core.adapters.keras.train_step import JaxBatch, current_batch
from eos_core.laws.base import Law
from eos_core.settings import DEPRECATED, TunerSettings

_OWNER = "CurvatureTuner"
_NEEDS_VALUE_FN = frozenset({S.CURVATURE, S.TRIAL_LOSS, S.LOSS}) | S.SPECTRAL

#: The [`TunerSettings`][eos_core.settings.TunerSettings] options the Keras tuner honours (on both backends).
SUPPORTED_OPTIONS: tuple[str, ...] = ("probe_every", "route", "sharpness_every", "sharpness_iters", "sharpness_tol",
                                      "warn", "seed", "reference_lr", "monitor_budget", "monitor_edge",
                                      "monitor_margin", "monitor_patience")
#: Routes on the torch backend (`jvp-*` need `torch.func.functional_call`, which Keras layers do not follow).
TORCH_ROUTES: tuple[str, ...] = (routes.AUTO, routes.DOUBLE_BACKWARD, *routes.FINITE_DIFFERENCES)
#: Version of the tuner's state layout in the optimizer's variables (read back by `load_own_variables`).
STATE_VERSION = 2
#: The laws a saved model may name without being registered with Keras: every law of [`eos_core.laws`][].
LAWS: dict[str, type[Law]] = {
    name: cls for name in core_laws.__all__
    if isinstance(cls := getattr(core_laws, name), type) and issubclass(cls, Law) and cls is not Law
}


def host_value(value: Any) -> np.ndarray:
    """A backend tensor (torch or JAX) as a numpy array.

    Args:
        value: a torch tensor (detached and moved to the CPU) or anything `numpy.asarray` takes.

    Returns:
        The array.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# -- laws in saved configs --------------------------------------------------------------------------------
def law_config(law: Law) -> dict[str, Any]:
    """A JSON-friendly description of `law`, for the tuner's `get_config`.

    Args:
        law: the law.

    Returns:
        `{"module", "class_name", "registered_name", "config"}`: the law's class (its module, its name and Keras'
        registered name, None when not registered) and its constructor settings; what `law_from_config` reads.
    """
    cls = type(law)
    return {"module": cls.__module__, "class_name": cls.__name__,
            "registered_name": keras.saving.get_registered_name(cls), "config": law._settings()}


def law_from_config(config: Mapping[str, Any], custom_objects: Mapping[str, Any] | None = None) -> Law:
    """The law `law_config` described, without importing any module the description names.

    The class is looked up, in this order, among the eos_core laws (`LAWS`, when `module` is an
    `eos_core` module or absent) and the classes registered with Keras: `registered_name` (then
    `class_name`) through `keras.saving.get_registered_object`, which sees
    `@keras.saving.register_keras_serializable` classes, `keras.saving.custom_object_scope` and the
    `custom_objects` given to `keras.models.load_model`.

    Args:
        config: the description (`class_name`, optional `registered_name` and `module`, `config`).
        custom_objects: extra `{name: class}` to look the name up in.

    Returns:
        The law, built from `config["config"]`.

    Raises:
        ValueError: when the description is malformed, names a class that is neither an eos_core law nor
            registered with Keras, or names a registered object that is not an eos_core law.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("class_name"), str):
        raise ValueError(f"{_OWNER}: a saved law must be described by a dict with a 'class_name', got {config!r}")
    settings = config.get("config", {})
    if not isinstance(settings, Mapping):
        raise ValueError(f"{_OWNER}: the saved law's 'config' must be a dict, got {settings!r}")
    return _law_class(config, custom_objects)(**settings)


def _law_class(config: Mapping[str, Any], custom_objects: Mapping[str, Any] | None) -> type[Law]:
    name = config["class_name"]
    registered = config.get("registered_name") or name
    module = config.get("module")
    core = module is None or module == "eos_core" or str(module).startswith("eos_core.")
    found: Any = LAWS.get(name) if core else None
    for key in dict.fromkeys((registered, name)):
        if found is None:
            found = keras.saving.get_registered_object(key, custom_objects=custom_objects)
    if found is None:
        where = f"{module}.{name}" if module else name
        raise ValueError(
            f"{_OWNER}: the saved model names the law {where!r} (registered name {registered!r}), which is neither "
            f"an eos_core law ({', '.join(sorted(LAWS))}) nor registered with Keras. eos_core does not import modules "
            "named in a saved file; register the class with @keras.saving.register_keras_serializable() or pass "
            f"custom_objects={{{registered!r}: YourLaw}} to keras.models.load_model")
    if not (isinstance(found, type) and issubclass(found, Law)):
        raise ValueError(f"{_OWNER}: the saved law {registered!r} resolves to {found!r}, which is not an eos_core law")
    return found


# -- settings ------------------------------------------------------------------------------------------------
def resolve_settings(settings: TunerSettings | None, options: Mapping[str, Any], backend: str, *,
                     measuring: bool = False, owner: str = _OWNER) -> TunerSettings:
    """The tuner's settings: `settings` with `options` on top, checked.

    Old names are accepted with a DeprecationWarning; the check is `TunerSettings.from_options` against
    `SUPPORTED_OPTIONS` and the backend's routes.

    Args:
        settings: the options as one `TunerSettings`, or None.
        options: keyword options given to the tuner (they replace the values of `settings`).
        backend: `"jax"` or `"torch"`.
        measuring: the tuner has no law (`law=None`): `reference_lr` has no meaning then.
        owner: the name in the messages (the Keras callback validates its options here too).

    Returns:
        The checked settings.

    Raises:
        ValueError: naming the option, for an unknown or unsupported option or an invalid value, and for
            `reference_lr` with `law=None`.
    """
    given: dict[str, Any] = {}
    if settings is not None:
        if not isinstance(settings, TunerSettings):
            raise ValueError(f"{owner}: settings must be an eos_core.settings.TunerSettings, got {settings!r}")
        given = settings.as_dict()
        for name in options:
            given.pop(DEPRECATED.get(name, name), None)
    merged = {**given, **options}
    if backend == "torch" and merged.get("route") in (routes.JVP_JVP, routes.JVP_GRAD):
        raise ValueError(f"{owner}: route {merged['route']!r} is not available on the torch backend (forward-mode "
                         "routes need torch.func.functional_call, which Keras layers do not follow); choose one of "
                         f"{', '.join(TORCH_ROUTES)}")
    # stacklevel 4: a DeprecationWarning points at the line that built the tuner
    resolved = TunerSettings.from_options(owner, merged, supported=SUPPORTED_OPTIONS,
                                          supported_routes=TORCH_ROUTES if backend == "torch" else routes.ALL,
                                          stacklevel=4)
    if measuring and resolved.reference_lr is not None:
        raise ValueError(f"{owner}: reference_lr is the learning rate a law starts from; with law=None the wrapped "
                         "optimizer applies its own learning rate (or schedule): leave reference_lr unset")
    return resolved


@keras.saving.register_keras_serializable(package="eos_core")
class CurvatureTuner(keras.optimizers.Optimizer):
    r"""Drive a Keras optimizer with an eos_core tuning law: $w \leftarrow w + \eta u$, $u$ its update for lr = 1.

    Use it as the model's optimizer and train with `fit`; the probes need the loss on the current batch,
    which the model's `train_step` hands over once it is wrapped: pass
    [`EdgeOfStabilityCallback`][eos_core.integrations.keras.EdgeOfStabilityCallback] to `fit` (it wraps it and logs the
    diagnostics), or call [`attach`][eos_core.adapters.keras.attach] on the model yourself:

    ```python
    model.compile(optimizer=CurvatureTuner(keras.optimizers.SGD(0.1), CDAT(scale=2.0)),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=5, callbacks=[EdgeOfStabilityCallback()])
    ```

    Laws that need no curvature (`Constant`, `WarmupCosine`) work without the wrapper.

    **Monitoring only** (`law=None`): the wrapped optimizer steps exactly as it would on its own (its own learning
    rate or `LearningRateSchedule`, its own update: the weights are bit for bit those of a run without the tuner)
    and the tuner measures beside it: the sharpness monitor (`monitor_budget`), `sharpness_every`, the loss, the
    gradient and update norms. This is what
    [`EdgeOfStabilityCallback(law=None)`][eos_core.integrations.keras.EdgeOfStabilityCallback] installs on a model
    compiled with a plain Keras optimizer.

    Args:
        optimizer: a Keras optimizer (SGD with or without momentum / Nesterov, Adam, AdamW, RMSprop, Adagrad,
            Adamax, Nadam, Adadelta, Lion). With a law it must have a numeric `learning_rate` and not have stepped;
            the tuner takes it over: its learning rate is set to 1 (its update is then `u`) and the law starts from
            the learning rate it had. Gradient clipping and weight decay set on it are honoured (`u` is formed from
            the clipped gradient and includes `-weight_decay * w`); `use_ema`, `gradient_accumulation_steps` and
            `loss_scale_factor` are refused. With `law=None` it keeps its learning rate (a schedule too) and may
            have stepped already.
        law: a law from [`eos_core.laws`][]: `CDAT`, `Polyak`, `Constant`, `WarmupCosine`, `Armijo`,
            `HyperGradient`, `ExactSharpness`, `AdaEoS` (their `preconditioned=True` variants on the JAX
            backend with Adam / AdamW / RMSprop), or a subclass registered with Keras; None to only measure (see
            above). `DCAO` is refused: it rewrites the momentum and weight decay, which Keras optimizers keep as
            Python constants compiled into the train step.
        settings: the options as one [`TunerSettings`][eos_core.settings.TunerSettings]; keyword `options` given as
            well replace its values.
        name: the optimizer's name.
        **options: the [`TunerSettings`][eos_core.settings.TunerSettings] options this tuner supports
            ([`SUPPORTED_OPTIONS`][eos_core.adapters.keras.SUPPORTED_OPTIONS]), by the names every adapter uses:

            * `probe_every`: measure the law's statistics every `probe_every` steps (steps 0, k, 2k, ...
              of the steps taken) and reuse the learning rate in between.
            * `route`: the $u^\top H u$ oracle. JAX: `auto` (jvp-jvp, then jvp-grad, double-backward,
              fd-onesided: the first that traces), `jvp-jvp`, `jvp-grad`, `double-backward`,
              `fd-central`, `fd-onesided`. torch: `auto` (double backward, falling back to one-sided
              finite differences), `double-backward`, `fd-central`, `fd-onesided`.
            * `sharpness_every`: every that many steps, estimate $\lambda_{\max}$ of the Hessian by warm-started
              power iteration and report `sharpness`, `lr_sharpness` (2 at the edge), `alignment` and,
              for Adam / AdamW / RMSprop without momentum, `preconditioned_sharpness`. None: off.
            * `sharpness_iters`, `sharpness_tol`: power-iteration budget and relative stopping tolerance.
            * `reference_lr`: the learning rate the law starts from when it sets no `lr_init`; default:
              the wrapped optimizer's. Refused with `law=None`.
            * `monitor_budget`: the sharpness monitor, a fraction of training time in (0, 1] (None, the default:
              off). A streaming estimate of lambda_max of the Hessian (and, with Adam / AdamW / RMSprop without
              momentum, of the preconditioned Hessian `P^{-1/2} H P^{-1/2}`) advanced by one Hessian-vector
              product every `k` steps ([`eos_core.monitor`][]), reported as `sharpness`, `lr_sharpness`,
              `preconditioned_sharpness`, `preconditioned_lr_sharpness` on every step (the latest estimate, with
              `sharpness_age` and `sharpness_residual`), plus `edge`, `unstable`, `monitor_every`,
              `monitor_exact` and, on an adaptive optimizer's first step, `update_quotient`. On torch `k` follows
              the measured cost of a product relative to a step (the PyTorch adapter's monitor); on JAX, where
              nothing can be timed inside `jit`, the JAX adapter's cost model (one finite-difference product = 1.1
              steps: `k = 22` at 0.05 with one operator).
            * `monitor_edge`: the edge of stability lr x sharpness is compared with (default: the optimizer's,
              `eos_core.adapters.keras.optimizers.edge`: 2 (1 + momentum) for SGD, 2 (1 + momentum) /
              (1 + 2 momentum) with Nesterov, 2 (1 + beta_1) / (1 - beta_1) on the preconditioned sharpness for
              Adam / AdamW, 2 on it for RMSprop without momentum; not known for the others, which then never
              warn unless it is given).
            * `monitor_margin`, `monitor_patience`: the early warning: lr x sharpness (preconditioned for Adam /
              AdamW / RMSprop) above `edge * (1 + monitor_margin)` on `monitor_patience` consecutive fresh
              measurements (or one that is a Ritz value of the step's own Hessian) sets `unstable` = 1 and
              raises a RuntimeWarning (once per episode). On torch the step warns as it runs; on JAX (with
              `warn=True`) the read of the diagnostics does
              ([`current_diagnostics`][eos_core.adapters.keras.current_diagnostics], which the callback calls).
            * `seed`: seed of the spectral start vectors ([`eos_core.spectral.random_start`][]; `seed`
              for H, `seed + 1` for the preconditioned Hessian), the same start as PyTorch's and JAX's.
            * `warn`: how skipped steps and law fallbacks are reported (RuntimeWarnings; the counts `skipped_steps` and
              `fallback_steps` are in the diagnostics whatever the setting). `True` (default): on torch the step warns
              as it runs. On JAX the jitted step holds no host callback (one costs about 10% on every step); the
              warnings are raised on the host by [`current_diagnostics`][eos_core.adapters.keras.current_diagnostics],
              for every step skipped and every fallback since its previous call, and
              [`EdgeOfStabilityCallback`][eos_core.integrations.keras.EdgeOfStabilityCallback] calls it after each batch
              it logs. The callback, which the curvature laws need anyway, therefore warns at the batch where a step was
              skipped; a `fit` without it raises none until `current_diagnostics(model)` is called (the
              [`diagnostics`][eos_core.adapters.keras.CurvatureTuner.diagnostics] property reports nothing: Keras's
              saving reads it). `"jit"`: on JAX, warnings from inside the jitted step (`jax.debug.callback`, with its
              per-step cost) without any read; on torch the same as True. `False`: no warnings.

            `initial_lr` is the deprecated name of `reference_lr` (DeprecationWarning). The other
            options of [`TunerSettings`][eos_core.settings.TunerSettings] (`lr_mode`, `skip_nonfinite`,
            `fd_eps`, `fd_above`, `clipped_gradients`, `linear_in_lr`) raise a ValueError when given
            a value other than their default.

    Bad input: a step whose loss or gradient is NaN/Inf is skipped (weights and optimizer state unchanged,
    `skipped` = 1, a RuntimeWarning as `warn` says) and training continues; a non-finite or degenerate
    curvature keeps the last good learning rate (`fallback` = 1, a RuntimeWarning). Invalid settings raise
    ValueError here, naming the setting.

    Diagnostics: [`diagnostics`][eos_core.adapters.keras.CurvatureTuner.diagnostics] (after `fit`) and
    [`current_diagnostics`][eos_core.adapters.keras.current_diagnostics] (inside callbacks) hold exactly
    `eos_core.diagnostics.keys_for(law)`, with the meanings of [`eos_core.diagnostics.REGISTRY`][], on both backends
    (`step` is the index of the step described, skipped steps not counted).

    State: everything (law state, counters, warm-start vectors, the sharpness monitor's trackers, credit and
    warning, the wrapped optimizer's slots, the last step's diagnostics) lives in Keras variables, so `model.save` /
    `keras.models.load_model` and the checkpoint callbacks restore it and a resumed run continues the same
    learning-rate trajectory and the same monitor schedule. The first of the tuner's own variables after
    `iterations` and `learning_rate` holds the layout's version
    (`eos_core.adapters.keras.tuner.STATE_VERSION`); loading a state of a newer version, or one
    with another number of variables (another law, other settings such as `sharpness_every` or `monitor_budget`,
    another release), raises a ValueError instead of Keras's skip-with-a-warning. The `learning_rate` variable
    holds the learning rate the last step applied (writing it has no effect: the law decides; with `law=None` the
    wrapped optimizer's rate of that step).

    Raises:
        ValueError: an optimizer, law or option this tuner cannot honour (see `optimizer`, `law` and the options
            above), naming it.
    """

    def __init__(
        self,
        optimizer: Any,
        law: Law | None,
        *,
        settings: TunerSettings | None = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        backend = keras.backend.backend()
        measuring = law is None
        resolved = resolve_settings(settings, options, backend, measuring=measuring)
        check_supported(_OWNER, optimizer, measuring=measuring)
        if measuring:
            start = current_lr(optimizer)
        else:
            self._check_law(law)
            start = resolved.reference_lr
            if start is None:
                start = check.non_negative(_OWNER, "the optimizer's learning_rate",
                                           float(optimizer._learning_rate.value))
            law.init(start)  # a law that cannot start raises its ValueError here, at construction
            if law.request().preconditioned:
                self._check_preconditioned(backend, optimizer, law)

        super().__init__(learning_rate=float(start), name=name)
        self.settings = resolved
        #: the learning rate the law starts from (`reference_lr`, else the wrapped optimizer's); with `law=None`
        #: the wrapped optimizer's learning rate when the tuner was built
        self.reference_lr = float(start)
        self.inner_optimizer = optimizer
        #: `law=None`: the wrapped optimizer applies its own update, the tuner only measures
        self.measuring = measuring
        if not measuring:
            optimizer.learning_rate = 1.0
        self.law = law
        #: the edge of stability of the monitor's warning and whether it bounds the preconditioned sharpness
        #: (`monitor_edge` when given, else `eos_core.adapters.keras.optimizers.edge` of the optimizer)
        found_edge, preconditioned_edge = optimizer_edge(optimizer)
        self.edge: tuple[float, bool] = (
            float(resolved.monitor_edge) if resolved.monitor_edge is not None else found_edge, preconditioned_edge)
        self._state_version: Any = None
        if backend == "jax":
            from eos_core.adapters.keras.jax_engine import JaxEngine

            self._engine: Any = JaxEngine(self, law)
        else:
            from eos_core.adapters.keras.torch_engine import TorchEngine

            self._engine = TorchEngine(self, law)

    @staticmethod
    def _check_law(law: Any) -> None:
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

    # -- the options, read from the settings ----------------------------------------------------------------
    @property
    def probe_every(self) -> int:
        """The `probe_every` option: the law's statistics are measured every that many steps."""
        return self.settings.probe_every

    @property
    def route(self) -> str:
        """The `route` option: the curvature route asked for (`auto` until resolved by the backend's adapter)."""
        return self.settings.route

    @property
    def sharpness_every(self) -> int | None:
        """The `sharpness_every` option: sharpness tracked every that many steps (None: off)."""
        return self.settings.sharpness_every

    @property
    def sharpness_iters(self) -> int:
        """The `sharpness_iters` option: the most power-iteration products per tracked step."""
        return self.settings.sharpness_iters

    @property
    def sharpness_tol(self) -> float:
        """The `sharpness_tol` option: relative change of the eigenvalue that stops power iteration."""
        return self.settings.sharpness_tol

    @property
    def seed(self) -> int:
        """The `seed` option: seed of the spectral start vectors."""
        return self.settings.seed

    @property
    def warn(self) -> bool | str:
        """The `warn` option: True, `"jit"` or False (how skipped steps and fallbacks are reported)."""
        return self.settings.warn

    @property
    def monitor_budget(self) -> float | None:
        """The `monitor_budget` option: the sharpness monitor's share of training time (None: off)."""
        return self.settings.monitor_budget

    @property
    def monitor_edge(self) -> float | None:
        """The `monitor_edge` option as given (None: the optimizer's edge, `edge[0]`)."""
        return self.settings.monitor_edge

    @property
    def monitor_margin(self) -> float:
        """The `monitor_margin` option: the warning's threshold is `edge * (1 + monitor_margin)`."""
        return self.settings.monitor_margin

    @property
    def monitor_patience(self) -> int:
        """The `monitor_patience` option: consecutive measurements above the threshold that warn."""
        return self.settings.monitor_patience

    @property
    def initial_lr(self) -> float:
        """Deprecated name of `reference_lr`, the learning rate the law starts from."""
        return self.reference_lr

    # -- Keras optimizer protocol ------------------------------------------------------------------
    def build(self, var_list: list[Any]) -> None:
        """Build the wrapped optimizer and the tuner's own variables (the engine's state) on `var_list`.

        The wrapped optimizer is built unless `fit` built it already, on the same variables. Nothing happens when
        the tuner is built already.

        Args:
            var_list: the model's trainable variables.

        Raises:
            ValueError: the wrapped optimizer was built on other variables.
        """
        if self.built:
            return
        inner = self.inner_optimizer
        if not inner.built:
            inner.build(var_list)
        elif [id(v) for v in inner._trainable_variables] != [id(v) for v in var_list]:
            # fit builds a compiled optimizer on the model's variables before the callback wraps it: those are fine
            raise ValueError(f"{_OWNER}: the wrapped optimizer was built on other variables than the model's "
                             "trainable variables; pass a freshly created optimizer")
        super().build(var_list)
        self._state_version = self.add_variable(shape=(), dtype="int32", initializer="zeros",
                                                name="eos_core_state_version")
        self._state_version.assign(STATE_VERSION)
        self._engine.build(var_list)

    @property
    def variables(self) -> list[Any]:
        """Every variable: the tuner's own (`iterations`, `learning_rate`, the state), then the wrapped optimizer's."""
        return self._variables + self.inner_optimizer.variables

    def stateless_apply(self, optimizer_variables: list[Any], grads: list[Any], trainable_variables: list[Any]
                        ) -> tuple[list[Any], list[Any]]:
        """One tuned step as a pure function of the values (Keras's JAX trainer calls it inside the jitted step).

        On JAX the engine's `update` runs the law with the loss on the batch the wrapped `train_step` published;
        on the other backends Keras's own `stateless_apply` (which calls `apply`).

        Args:
            optimizer_variables: the values of [`variables`][eos_core.adapters.keras.CurvatureTuner.variables], in
                that order.
            grads: the gradients, one per trainable variable.
            trainable_variables: the trainable variables' values.

        Returns:
            `(new trainable values, new optimizer variable values)`: the weights after the step (the variables'
            constraints applied) and every optimizer variable's new value (`iterations` + 1, `learning_rate` the
            rate the step applied).

        Raises:
            ValueError: the tuner is not built.
            RuntimeError: the step needs the loss on the batch and the model's `train_step` is not wrapped
                ([`attach`][eos_core.adapters.keras.attach]).
        """
        if keras.backend.backend() != "jax":
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        if not self.built:
            raise ValueError(f"To call `stateless_apply`, {_OWNER} must be built: optimizer.build(trainable_variables)")
        engine = self._engine
        values = [v.value if is_variable(v) else v for v in optimizer_variables]
        params = [v.value if is_variable(v) else v for v in trainable_variables]
        own, inner = values[:len(self._variables)], values[len(self._variables):]
        position = {id(v): i for i, v in enumerate(self._variables)}
        state_values = [own[position[id(v)]] for v in engine.state_variables]
        weights, new_state, new_inner, lr = engine.update(state_values, inner, list(grads), params,
                                                          self._value_fn(len(params)))
        if not self.measuring:  # law=None: the wrapped optimizer's own step applied the constraints
            weights = [v.constraint(w) if v.constraint is not None else w
                       for v, w in zip(self._trainable_variables, weights, strict=True)]
        new_own = list(own)
        for variable, value in zip(engine.state_variables, new_state, strict=True):
            new_own[position[id(variable)]] = value
        iterations = position[id(self._iterations)]
        new_own[iterations] = own[iterations] + 1
        if is_variable(self._learning_rate):
            lr_index = position[id(self._learning_rate)]
            new_own[lr_index] = keras.ops.cast(lr, own[lr_index].dtype)
        return weights, new_own + new_inner

    def apply(self, grads: list[Any], trainable_variables: list[Any] | None = None) -> None:
        """One tuned step on the variables in place (what `fit` calls on torch; on JAX through `stateless_apply`).

        Builds the tuner on `trainable_variables` at the first call. The variables' constraints are applied after
        the step (with a law; with `law=None` the wrapped optimizer applies them), `iterations` advances by one and
        `learning_rate` holds the rate applied.

        Args:
            grads: the gradients, one per trainable variable.
            trainable_variables: the model's trainable variables (needed at the first call, to build).

        Raises:
            ValueError: the first call without `trainable_variables`, or variables the tuner was not built on.
            RuntimeError: the step needs the loss on the batch and the model's `train_step` is not wrapped
                ([`attach`][eos_core.adapters.keras.attach]).
        """
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
        for variable in self._trainable_variables if not self.measuring else ():  # law=None: applied by the optimizer
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        self._iterations.assign_add(1)
        if is_variable(self._learning_rate) and math.isfinite(lr):
            self._learning_rate.assign(lr)

    def _value_fn(self, n_params: int) -> Any:
        batch = current_batch()
        if not isinstance(batch, JaxBatch) or len(batch.trainable) != n_params:
            if self.needs_batch:
                raise RuntimeError(self.no_batch_message())
            return None
        return batch.value_fn

    @property
    def needs_batch(self) -> bool:
        """Whether a step needs the loss on the batch: the law evaluates it, or `sharpness_every` / the monitor do."""
        law_needs = self.law is not None and bool(self.law.needs & _NEEDS_VALUE_FN)
        return law_needs or self.sharpness_every is not None or self.monitor_budget is not None

    def no_batch_message(self) -> str:
        """The error message of a step that needs the loss on the batch and was not given it.

        Returns:
            The message, naming the law (or the sharpness measurement) and how to wrap the model's `train_step`.
        """
        who = type(self.law).__name__ if self.law is not None else "the sharpness measurement"
        return (f"{_OWNER}: {who} needs the loss on the current batch, but the model's train_step "
                "does not provide it. Pass eos_core.integrations.keras.EdgeOfStabilityCallback() to fit, or call "
                "eos_core.adapters.keras.attach(model) after compile (and again after keras.models.load_model).")

    # -- loading a saved state ------------------------------------------------------------------------------
    def load_own_variables(self, store: Any) -> None:
        """Load the optimizer variables from a saved store (Keras's saving calls it) and hand them to the engine.

        Args:
            store: Keras's variable store, `store[str(i)]` the value of variable `i`.

        Raises:
            ValueError: a saved state this tuner cannot resume (a newer layout version, or another number of
                variables: another law, other settings, another wrapped optimizer or release).
        """
        if self.built:
            self._check_saved_state(len(store.keys()), lambda i: store[str(i)])
        super().load_own_variables(store)
        self._engine.mark_loaded()

    def set_weights(self, weights: list[Any]) -> None:
        """Set every variable of [`variables`][eos_core.adapters.keras.CurvatureTuner.variables], in that order.

        The tuner's own variables come first, then the wrapped optimizer's; the engine reads the new state at once.

        Args:
            weights: one value per variable (e.g. from `[v.numpy() for v in tuner.variables]`).

        Raises:
            ValueError: the tuner is not built (Keras's own error), a saved state it cannot resume (see
                `load_own_variables`), or a value whose shape differs from its variable's.
        """
        if not self.built:
            super().set_weights(weights)  # raises: not built
        weights = list(weights)
        self._check_saved_state(len(weights), lambda i: weights[i])
        for variable, weight in zip(self.variables, weights, strict=True):
            if tuple(variable.shape) != tuple(np.shape(weight)):
                raise ValueError(f"{_OWNER}: optimizer variable {variable.path} has shape {tuple(variable.shape)}, "
                                 f"the weight given for it {tuple(np.shape(weight))}")
            variable.assign(weight)
        self._engine.mark_loaded()

    def _check_saved_state(self, count: int, get: Any) -> None:
        """A saved optimizer state this tuner can take: the layout version and the number of variables agree.

        A state saved before the optimizer was built (a model saved before training: the tuner's and the wrapped
        optimizer's `iterations` and `learning_rate` only) holds nothing to resume; it is left to Keras,
        which skips it with a warning.

        Raises:
            ValueError: for a state of a newer layout version, or of another shape (another law, other
                settings, another optimizer, or a release before the layout had a version).
        """
        index = next(i for i, v in enumerate(self.variables) if v is self._state_version)
        if count == index + 2:  # never built: iterations and learning_rate of the tuner, then of the optimizer
            return
        version = None
        if index < count:
            value = np.asarray(get(index))
            if value.ndim == 0 and value.dtype.kind in "iu":
                version = int(value)
        if version is not None and version > STATE_VERSION:
            raise ValueError(f"{_OWNER}: the checkpoint's tuner state has version {version}, newer than this eos_core "
                             f"reads (version {STATE_VERSION}): it was saved by a newer eos_core; upgrade to load it")
        expected = len(self.variables)
        if count != expected or version != STATE_VERSION:
            saved_by = "an eos_core release before the state had a version" if version is None else f"version {version}"
            raise ValueError(
                f"{_OWNER}: the checkpoint holds {count} optimizer variables ({saved_by}), this tuner has {expected} "
                f"(state version {STATE_VERSION}): it was saved with another law, other settings (sharpness_every, "
                "monitor_budget, ...), another wrapped optimizer or another eos_core release, and cannot resume this "
                "run")

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        """Nothing to finalise (no EMA of the weights)."""

    # -- reading -----------------------------------------------------------------------------------
    @property
    def diagnostics(self) -> dict[str, Any]:
        """The last step's diagnostics, read from the variables: exactly `eos_core.diagnostics.keys_for(law)`.

        Outside `fit` on JAX, any time on torch; empty before the tuner is built. A plain read: it reports
        nothing (Keras's saving visits every attribute of the optimizer, this one too).
        [`current_diagnostics`][eos_core.adapters.keras.current_diagnostics] is the read that works inside `fit` and
        raises `warn=True`'s warnings on JAX.

        Raises:
            RuntimeError: read inside `fit` on JAX, where the variables are not synced (use `current_diagnostics`).
        """
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
        return float(self.diagnostics.get("lr", self.reference_lr))

    # -- serialisation -----------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The tuner's constructor arguments, for Keras's saving.

        Returns:
            A JSON-friendly dict: `name`, `optimizer` (the wrapped optimizer, serialised by Keras), `law` (its
            class and settings, `law_config`; None when only measuring) and every option (`reference_lr` None
            when only measuring); [`from_config`][eos_core.adapters.keras.CurvatureTuner.from_config] rebuilds the
            tuner from it.
        """
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "law": None if self.law is None else law_config(self.law),
            "probe_every": self.probe_every,
            "route": self.route,
            "sharpness_every": self.sharpness_every,
            "sharpness_iters": self.sharpness_iters,
            "sharpness_tol": self.sharpness_tol,
            "reference_lr": None if self.measuring else self.reference_lr,
            "seed": self.seed,
            "warn": self.warn,
            "monitor_budget": self.monitor_budget,
            "monitor_edge": self.monitor_edge,
            "monitor_margin": self.monitor_margin,
            "monitor_patience": self.monitor_patience,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> CurvatureTuner:
        """The tuner [`get_config`][eos_core.adapters.keras.CurvatureTuner.get_config] described.

        Configs saved with `initial_lr`, or before the monitor options, load too.

        The law is resolved by `eos_core.adapters.keras.tuner.law_from_config` (eos_core laws
        and Keras-registered classes only); a saved `law` of None is a monitoring-only tuner.

        Args:
            config: [`get_config`][eos_core.adapters.keras.CurvatureTuner.get_config]'s dict.
            custom_objects: extra `{name: class}` for the law and the optimizer.

        Returns:
            The tuner.

        Raises:
            ValueError: a law that cannot be resolved, or an invalid option.
        """
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        saved_law = config.pop("law")
        law = None if saved_law is None else law_from_config(saved_law, custom_objects)
        reference = config.pop("reference_lr", None)
        legacy = config.pop("initial_lr", None)  # configs saved before reference_lr: the same value
        reference = legacy if reference is None else reference
        if reference is not None and float(reference) > 0:
            config["reference_lr"] = float(reference)
        elif reference is not None:  # 0 (an optimizer built with lr 0) is the wrapped optimizer's own start
            optimizer.learning_rate = float(reference)
        return cls(optimizer, law, **config)

    def __repr__(self) -> str:
        return (f"CurvatureTuner({type(self.inner_optimizer).__name__}, {self.law!r}, probe_every={self.probe_every}, "
                f"route={self.route!r}, sharpness_every={self.sharpness_every}, monitor_budget={self.monitor_budget})")
