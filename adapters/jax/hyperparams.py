"""Reading and writing the base optimizer's hyperparameters through `optax.inject_hyperparams`.

A law that decides more than the learning rate (DCAO: `momentum`, `weight_decay`; see
`law.decides`) can only act on an optax optimizer whose hyperparameters live in its state, i.e.
one built with `optax.inject_hyperparams`. The law's names map to optax's argument names:
`momentum` -> `momentum` (`sgd`, `rmsprop`, ...) or `b1` (`adam`, `adamw`, ...);
`weight_decay` -> `weight_decay` (`adamw`, or a custom factory chaining
`optax.add_decayed_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from eos_core.adapters.jax.preconditioner import _INJECT_STATES, walk_states

#: optax argument names that carry each law-decided hyperparameter, in order of preference.
OPTAX_NAMES: dict[str, tuple[str, ...]] = {"momentum": ("momentum", "b1"), "weight_decay": ("weight_decay",)}


def injected(base_state: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The injected hyperparameters of every `optax.inject_hyperparams` state inside `base_state`.

    Args:
        base_state: an optax state (the base optimizer's), searched through chains, dicts and NamedTuples.

    Returns:
        One `(hyperparams, hyperparams_states)` pair per `InjectHyperparamsState` /
        `InjectStatefulHyperparamsState` found, outermost first: `hyperparams` maps optax argument names to
        their current values, `hyperparams_states` holds the states of the hyperparameters given as schedules
        (empty when none is).
    """
    return [(node.hyperparams, dict(getattr(node, "hyperparams_states", {}) or {}))
            for node, _ in walk_states(base_state) if _INJECT_STATES and isinstance(node, _INJECT_STATES)]


def resolve_names(base_state: Any, decides: tuple[str, ...]) -> dict[str, str | None]:
    """The optax hyperparameter that carries each hyperparameter a law decides.

    Each name is looked up in `OPTAX_NAMES` order (`momentum`, then `b1`), in the first injected state that has
    one of them.

    Args:
        base_state: the base optimizer's state.
        decides: the law's decided hyperparameters (`law.decides`, e.g. `("momentum", "weight_decay")`).

    Returns:
        `{law name: optax name}`, with None for a name the base has no injected hyperparameter for.
    """
    found = injected(base_state)
    out: dict[str, str | None] = {}
    for name in decides:
        out[name] = None
        for hyperparams, _ in found:
            key = next((k for k in OPTAX_NAMES.get(name, (name,)) if k in hyperparams), None)
            if key is not None:
                out[name] = key
                break
    return out


def is_scheduled(base_state: Any, key: str) -> bool:
    """Whether the injected hyperparameter `key` is a schedule (it would overwrite what a law sets).

    Args:
        base_state: the base optimizer's state.
        key: an optax hyperparameter name (e.g. `"momentum"`).

    Returns:
        True when some `inject_hyperparams` state of `base_state` keeps a schedule state for `key`.
    """
    return any(key in states for _, states in injected(base_state))


def read(base_state: Any, key: str) -> Any:
    """The current value of the injected hyperparameter `key`.

    Args:
        base_state: the base optimizer's state.
        key: an optax hyperparameter name (e.g. `"learning_rate"`, `"b1"`).

    Returns:
        The value in the first (outermost) injected state that has `key`: a 0-d array, traced under `jit`.

    Raises:
        KeyError: no injected state of `base_state` has `key`.
    """
    for hyperparams, _ in injected(base_state):
        if key in hyperparams:
            return hyperparams[key]
    raise KeyError(key)


def _rebuild(node: Any, fn: Callable[[Any], Any]) -> Any:
    if _INJECT_STATES and isinstance(node, _INJECT_STATES):
        node = fn(node)
        return node._replace(inner_state=_rebuild(node.inner_state, fn))
    if isinstance(node, dict):
        return {k: _rebuild(v, fn) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return node._make([_rebuild(c, fn) for c in node])
    if isinstance(node, list | tuple):
        return type(node)(_rebuild(c, fn) for c in node)
    return node


def write(base_state: Any, values: dict[str, Any]) -> Any:
    """`base_state` with injected hyperparameters replaced.

    Args:
        base_state: the base optimizer's state.
        values: `{optax name: new value}`; a name is set in every injected state that has it (names no state
            has are ignored), cast to the dtype of the value it replaces.

    Returns:
        A state of the same structure; `base_state` itself when `values` is empty.
    """
    if not values:
        return base_state

    def set_values(node: Any) -> Any:
        hyperparams = dict(node.hyperparams)
        for key, value in values.items():
            if key in hyperparams:
                hyperparams[key] = jnp.asarray(value).astype(jnp.result_type(hyperparams[key]))
        return node._replace(hyperparams=hyperparams)

    return _rebuild(base_state, set_values)
