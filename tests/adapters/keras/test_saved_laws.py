"""A saved model names its law by class: loading resolves it among the eos_core laws and the classes registered with
Keras, and never imports a module the file names (a file from another source must not run code on load)."""

import json
import sys
import uuid
import zipfile

import keras
import numpy as np
import pytest
from keras_helpers import compile_tuned, digits, mlp

from eos_core import CDAT, Constant, Polyak
from eos_core.adapters.keras import CurvatureTuner, find_tuner
from eos_core.adapters.keras.tuner import law_config, law_from_config
from eos_core.integrations.keras import EdgeOfStabilityCallback


@keras.saving.register_keras_serializable(package="eos_core_tests")
class RegisteredConstant(Constant):
    """A user's law, registered with Keras (which asks for a ``get_config``)."""

    def get_config(self):
        return self._settings()


class UnregisteredPolyak(Polyak):
    """A user's law that is not registered (loaded with custom_objects)."""


def saved_model(tmp_path, law, name="model.keras"):
    x, y = digits(64)
    model = compile_tuned(mlp(hidden=4), CurvatureTuner(keras.optimizers.SGD(0.1), law))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[EdgeOfStabilityCallback()])
    path = tmp_path / name
    model.save(path)
    return path


def law_descriptions(config):
    """Every law description (a dict under the key "law") in a saved model's config."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "law" and isinstance(value, dict) and "class_name" in value:
                yield value
            else:
                yield from law_descriptions(value)
    elif isinstance(config, list):
        for value in config:
            yield from law_descriptions(value)


def rewrite_law(path, **changes):
    """The saved model at ``path`` with its law description changed (as a file from another source could be)."""
    with zipfile.ZipFile(path) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    config = json.loads(entries["config.json"])
    found = list(law_descriptions(config))
    assert len(found) == 1
    found[0].update(changes)
    entries["config.json"] = json.dumps(config).encode()
    out = path.with_name("rewritten.keras")
    with zipfile.ZipFile(out, "w") as target:
        for name, data in entries.items():
            target.writestr(name, data)
    return out


@pytest.fixture
def payload_module(tmp_path, monkeypatch):
    """An importable module whose import leaves a marker file (what a malicious file would make Keras import)."""
    name = f"eos_core_payload_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from eos_core import CDAT\n\nclass Payload(CDAT):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize("class_name", ["Payload", "CDAT"])
def test_loading_never_imports_the_module_a_file_names(tmp_path, payload_module, class_name):
    name, marker = payload_module
    path = rewrite_law(saved_model(tmp_path, Constant(0.1)), module=name, class_name=class_name,
                       registered_name=class_name, config={})
    with pytest.raises(ValueError, match="neither an eos_core law .* nor registered with Keras"):
        keras.models.load_model(path)
    assert not marker.exists() and name not in sys.modules
    with pytest.raises(ValueError, match="does not import modules"):
        law_from_config({"module": name, "class_name": class_name, "config": {}})
    assert not marker.exists() and name not in sys.modules


def test_eos_core_laws_load_from_new_and_old_descriptions(tmp_path):
    law = CDAT(scale=1.5, ema=0.25)
    assert law_config(law) == {"module": "eos_core.laws.cdat", "class_name": "CDAT", "registered_name": "CDAT",
                               "config": law._settings()}
    assert law_from_config(law_config(law)) == law
    assert law_from_config({"module": "eos_core.laws.cdat", "class_name": "CDAT", "config": law._settings()}) == law
    assert law_from_config({"class_name": "CDAT", "config": {}}) == CDAT()
    restored = keras.models.load_model(saved_model(tmp_path, Constant(0.1)))
    assert find_tuner(restored).law == Constant(0.1)


def test_a_law_registered_with_keras_round_trips(tmp_path):
    law = RegisteredConstant(0.2)
    assert law_config(law)["registered_name"] == "eos_core_tests>RegisteredConstant"
    restored = keras.models.load_model(saved_model(tmp_path, law))
    tuner = find_tuner(restored)
    assert type(tuner.law) is RegisteredConstant and tuner.law == law


def test_an_unregistered_law_loads_with_custom_objects_only(tmp_path):
    path = saved_model(tmp_path, UnregisteredPolyak(lr_max=0.5))
    with pytest.raises(ValueError, match="custom_objects"):
        keras.models.load_model(path)
    restored = keras.models.load_model(path, custom_objects={"UnregisteredPolyak": UnregisteredPolyak})
    assert find_tuner(restored).law == UnregisteredPolyak(lr_max=0.5)
    x, y = digits(64)
    restored.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[EdgeOfStabilityCallback()])  # and it trains
    assert np.isfinite(find_tuner(restored).lr)


@pytest.mark.parametrize("config, match", [
    ({"class_name": "NoSuchLaw", "config": {}}, "'NoSuchLaw'.*neither an eos_core law .* nor registered with Keras"),
    ({"class_name": "Adam", "registered_name": "Adam", "config": {}}, "neither an eos_core law"),
    ({"class_name": "CDAT", "config": {"scale": 0.0}}, "scale"),
    ({"class_name": "CDAT", "config": [1]}, "'config' must be a dict"),
    ({"module": "eos_core.laws", "config": {}}, "class_name"),
    ("CDAT", "class_name"),
])
def test_bad_law_descriptions_raise_a_clear_error(config, match):
    with pytest.raises(ValueError, match=match):
        law_from_config(config)


def test_a_registered_object_that_is_not_a_law_is_refused():
    with pytest.raises(ValueError, match="not an eos_core law"):
        law_from_config({"class_name": "Thing", "config": {}}, custom_objects={"Thing": dict})
