"""The tuner's saved state: where it rides in the optimizer's state dict, and how it is read back.

The tuner's state (law state, step counters, resolved route, warm-start eigenvectors, previous update, last
diagnostics) travels in the optimizer's own `state_dict()`, so every framework that checkpoints the
optimizer checkpoints the tuner, and resuming is bit-identical. Versions 3 and 4 write it in three places,
filled by the optimizer's state-dict post-hook and emptied by its load pre-hook (tensors are shared, so
`torch.save` stores each once):

* `state_dict["eos_core"]`: the whole state as a dict (the layout of versions 1 and 2): `version`,
  `law` (class name), `law_state` (`law.state_to_host`: floats, integer counters as int), `step`
  (steps taken, skipped ones excluded), `calls`, `skipped_steps`, `fallback_steps`, `route`
  (resolved, or None), `exact_probes`, `reference_lr`, `previous_lr` (the lr applied to `previous_update`),
  `hyperparam_ratios`, `diagnostics` (the last step's), `monitor` (the sharpness monitor's scalars, version 4)
  and the vectors `eigenvector`, `preconditioned_eigenvector`, `previous_update` and the monitor's
  `MONITOR_VECTORS` (lists of tensors shaped like the parameters, or None).
* `state_dict["param_groups"][0]["eos_core"]`: the same without the vectors, as a JSON string (plus
  `vectors`, the names of those present), and
* `state_dict["state"][param]["eos_core_<vector>"]`: each vector's tensor for that parameter (a
  `DTensor` placed like the parameter when it is sharded; zeros where the vector does not exist yet but
  may, with its name absent from `vectors`).

Why the copy inside `param_groups` and `state`: `torch.distributed.checkpoint.state_dict`'s
`get_optimizer_state_dict` / `set_optimizer_state_dict` (torch 2.13, `_get_optim_state_dict` and
`_split_optim_state_dict`) rebuild the optimizer state dict from `state` and `param_groups` only, so a
top-level key is dropped in both directions, while per-parameter state entries are kept (gathered into
whole tensors for a full state dict, saved shard by shard and resharded on load for a sharded one) and so
are extra keys of a param group. The header is one JSON string rather than a nested dict so that
`torch.distributed.checkpoint.load` (which loads into the structure of the state dict it is given, here
the fresh tuner's) replaces it whole; the zero placeholders give that structure the vectors' tensors.
`StateDictOptions(flatten_optimizer_state_dict=True)` does not carry the tuner's state: its unflattening
keeps only the state and param-group keys the live optimizer has. Which vectors get placeholders depends on the
configuration (the law's needs, `sharpness_every`, an optimizer with a preconditioner): resume with the tuner
configured as when saving. A vector the checkpoint has and the resumed configuration does not use is dropped; one
it uses and the checkpoint lacks makes `torch.distributed.checkpoint.load` report a missing key (load with
`DefaultLoadPlanner(allow_partial_load=True)` to start that vector afresh).

`take_from_optimizer` collects a state that a load put into the optimizer before the tuner attached
(the Hugging Face `Trainer` loads `optimizer.pt` before any callback sees the optimizer; torch's
`load_state_dict` keeps unknown param-group keys and per-parameter entries).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from eos_core.monitor import TRACKER_RESTART

#: the key of the tuner's state in `optimizer.state_dict()` and in its first param group
STATE_KEY = "eos_core"
#: the version of that state written now; versions 1 to 5 are read (4 added the sharpness monitor's state, 5 gave its
#: trackers a third Lanczos vector: a version-4 tracker resumes from its eigenvector estimate)
STATE_VERSION = 5
#: the fields a saved tuner state cannot do without (every version)
REQUIRED_STATE_FIELDS = ("version", "law", "law_state", "step", "reference_lr")
#: the sharpness monitor's vectors (its trackers' Lanczos bases; `eos_core.adapters.torch.monitor`)
MONITOR_VECTORS = tuple(f"{prefix}monitor_basis_{i}" for prefix in ("", "preconditioned_")
                        for i in range(TRACKER_RESTART))
#: the state's vectors, shaped like the parameters
VECTORS = ("eigenvector", "preconditioned_eigenvector", "previous_update", *MONITOR_VECTORS)
#: prefix of the vectors' keys in the per-parameter state
VECTOR_PREFIX = STATE_KEY + "_"


def check_header(saved: Any) -> None:
    """Check that a saved tuner state is one this release can read: the required fields and a known version.

    Args:
        saved: the saved tuner state (the dict under `"eos_core"`).

    Raises:
        ValueError: not a mapping, a field of `REQUIRED_STATE_FIELDS` missing, a version that is not an integer
            >= 1, or a version newer than `STATE_VERSION`.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"the checkpoint's tuner state must be a dict, got {type(saved).__name__}")
    missing = [key for key in REQUIRED_STATE_FIELDS if key not in saved]
    if missing:
        raise ValueError(f"the checkpoint's tuner state lacks {missing} (a state saved by CurvatureTuner has "
                         f"{list(REQUIRED_STATE_FIELDS)})")
    version = saved["version"]
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
        raise ValueError(f"the checkpoint's tuner state has an invalid version {version!r}")
    if version > STATE_VERSION:
        raise ValueError(f"the checkpoint's tuner state has version {version}, newer than this eos_core reads "
                         f"(versions 1 to {STATE_VERSION}): it was saved by a newer eos_core; upgrade to load it")


def parameter_keys(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                   params: Sequence[torch.Tensor]) -> list[Any]:
    """The keys of `params` in `state_dict["state"]`.

    Torch's own pairing: the saved groups' `params` lists (indices, or parameter names after
    `torch.distributed.checkpoint`), concatenated, are matched in order with the optimizer's parameters.

    Args:
        state_dict: an optimizer state dict (its `param_groups`).
        optimizer: the optimizer the state dict belongs to.
        params: parameters of `optimizer` whose keys are wanted.

    Returns:
        The key of each parameter of `params`, in the same order.

    Raises:
        ValueError: the state dict's groups do not hold as many parameters as the optimizer's.
    """
    saved = [key for group in state_dict.get("param_groups", ()) for key in group["params"]]
    current = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved) != len(current):
        raise ValueError(f"the optimizer state dict has {len(saved)} parameters, the optimizer {len(current)}")
    by_id = {id(p): key for key, p in zip(saved, current, strict=True)}
    return [by_id[id(p)] for p in params]


def _plain(value: Any) -> Any:
    """JSON's fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write(state_dict: dict[str, Any], keys: Sequence[Any], header: Mapping[str, Any],
          vectors: Mapping[str, Sequence[torch.Tensor] | None], slots: Sequence[str],
          placeholder: Callable[[], list[torch.Tensor]]) -> dict[str, Any]:
    """Put the tuner's state into `state_dict`, in the three places the module docstring describes.

    Args:
        state_dict: the optimizer's state dict (changed: new top-level key, new first-group and state dicts;
            the optimizer's own dicts are not modified).
        keys: the trainable parameters' keys in `state_dict["state"]` (from `parameter_keys`).
        header: every field but the vectors.
        vectors: each of `VECTORS`: a list of tensors in state-dict form, or None.
        slots: the vectors written into the per-parameter state even when None (as zeros): those that may
            exist in this configuration, so that a fresh tuner's state dict can receive them.
        placeholder: returns zeros shaped like the parameters, in state-dict form.

    Returns:
        `state_dict` itself, with the tuner's state added.
    """
    state_dict[STATE_KEY] = {**header, **{name: None if vectors[name] is None else list(vectors[name])
                                          for name in VECTORS}}
    present = [name for name in VECTORS if vectors[name] is not None]
    groups = list(state_dict["param_groups"])
    groups[0] = {**groups[0], STATE_KEY: json.dumps({**header, "vectors": present}, default=_plain)}
    state_dict["param_groups"] = groups
    written = [name for name in VECTORS if name in present or name in slots]
    if written:
        state = dict(state_dict["state"])
        entries = {key: dict(state.get(key, {})) for key in keys}
        for name in written:
            values = vectors[name] if vectors[name] is not None else placeholder()
            for key, tensor in zip(keys, values, strict=True):
                entries[key][VECTOR_PREFIX + name] = tensor
        state.update(entries)
        state_dict["state"] = state
    return state_dict


def take(state_dict: Mapping[str, Any], keys: Sequence[Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split a state dict into the tuner's state and the optimizer's own state dict.

    The top-level dict is read when there is one; else the first group's JSON header with the vectors from the
    per-parameter state. The tuner's entries are removed from the returned optimizer state dict either way
    (`state_dict` itself is not modified).

    Args:
        state_dict: an optimizer state dict, with or without the tuner's state.
        keys: the trainable parameters' keys in `state_dict["state"]`, as for `write` (None: the parameters cannot
            be paired; only the optimizer's own state dict is of use then, and a header that lists vectors gives
            no tuner state).

    Returns:
        `(tuner_state, optimizer_state_dict)`: the tuner's state as a dict (None when the state dict carries none)
        and the optimizer's state dict without the tuner's entries.

    Raises:
        ValueError: a header that lists a vector which the per-parameter state holds for some parameters but not
            all, or a header that is not readable JSON.
    """
    cleaned = dict(state_dict)
    top = cleaned.pop(STATE_KEY, None)
    header = None
    if cleaned.get("param_groups"):
        groups = [dict(g) for g in cleaned["param_groups"]]
        header = groups[0].pop(STATE_KEY, None)
        cleaned["param_groups"] = groups
    found: dict[Any, dict[str, Any]] = {}
    if isinstance(cleaned.get("state"), Mapping):
        state = {}
        for key, entry in cleaned["state"].items():
            if isinstance(entry, Mapping) and any(str(n).startswith(VECTOR_PREFIX) for n in entry):
                found[key] = {n[len(VECTOR_PREFIX):]: v for n, v in entry.items() if str(n).startswith(VECTOR_PREFIX)}
                entry = {n: v for n, v in entry.items() if not str(n).startswith(VECTOR_PREFIX)}
                if not entry:
                    continue  # the optimizer had no state for this parameter
            state[key] = entry
        cleaned["state"] = state
    if top is not None:
        return dict(top), cleaned
    if header is None:
        return None, cleaned
    return _from_header(header, found, keys), cleaned


def _from_header(header: Any, found: Mapping[Any, Mapping[str, Any]], keys: Sequence[Any] | None
                 ) -> dict[str, Any] | None:
    if isinstance(header, bytes):
        header = header.decode()
    try:
        saved = json.loads(header) if isinstance(header, str) else dict(header)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's tuner state in the first param group is unreadable: {error}") from error
    names = saved.pop("vectors", [])
    for name in VECTORS:
        saved[name] = None
    for name in names:
        if keys is None:
            return None
        missing = [key for key in keys if name not in found.get(key, {})]
        if len(missing) == len(keys):  # a template without it (the resumed tuner's configuration does not use it)
            continue
        if missing:
            raise ValueError(f"the checkpoint's tuner state lists a {name}, but the optimizer state lacks it for "
                             f"parameter(s) {missing[:3]} (StateDictOptions(flatten_optimizer_state_dict=True) drops "
                             "the tuner's state; use the default nested optimizer state dict)")
        saved[name] = [found[key][name] for key in keys]
    return saved


def take_from_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict[str, Any] | None:
    """The tuner state a load left in the optimizer before a tuner attached.

    The state's entries are removed from the optimizer's first param group and per-parameter state either way
    (a parameter whose state held nothing else loses its entry).

    Args:
        optimizer: the optimizer, after `load_state_dict` and before the tuner attached.
        params: the trainable parameters, in the tuner's order.

    Returns:
        The tuner's state as a dict, or None when the optimizer holds none.

    Raises:
        ValueError: as `take`.
    """
    header = optimizer.param_groups[0].pop(STATE_KEY, None) if optimizer.param_groups else None
    found: dict[Any, dict[str, Any]] = {}
    for index, p in enumerate(params):
        entry = optimizer.state.get(p)
        if not entry:
            continue
        names = [n for n in entry if str(n).startswith(VECTOR_PREFIX)]
        if names:
            found[index] = {n[len(VECTOR_PREFIX):]: entry.pop(n) for n in names}
            if not entry:
                del optimizer.state[p]
    if header is None:
        return None
    return _from_header(header, found, list(range(len(params))))
