"""Registries: models by name (`--model NAME`) and pre-training methods by model-name prefix.

A method (MAE, MI-MAE, ...) is one models file: its factories carry `util.spec.model_factory`, and its
`METHODS` tuple of `util.spec.Method` says which knobs the method adds (flags, checks, model arguments). The
registry imports the files of MODEL_MODULES (or one given to `register_module`) and reads both; the files never
import the registry, so there is no import circle. The engine never needs to know the method.
"""
import argparse
import importlib
import os
from typing import Callable

import torch.nn as nn

from util.spec import Method, add_knobs

# The models files; a new method adds its file here, or names its module in $MIM_METHODS (plugin_modules).
PLUGIN_VARIABLE = "MIM_METHODS"
MODEL_MODULES = ["models_mae", "models_vit", "models_mi_mae", "models_m_mae", "models_cmae"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_METHODS: dict[str, Method] = {}
_REGISTERED: set[str] = set()


def register_module(name: str) -> None:
    """Import the models file `name` (once) and register its model factories and its METHODS."""
    if name in _REGISTERED:
        return
    module = importlib.import_module(name)
    for value in list(vars(module).values()):
        # a factory imported from another models file belongs to that file
        if getattr(value, "is_model_factory", False) and value.__module__ == module.__name__:
            if value.__name__ in _MODELS:
                raise ValueError(f"model {value.__name__!r} is registered twice")
            _MODELS[value.__name__] = value
    for method in getattr(module, "METHODS", ()):
        if method.prefix in _METHODS:
            raise ValueError(f"a method with model prefix {method.prefix!r} is registered twice")
        _METHODS[method.prefix] = method
    _REGISTERED.add(name)
    if name not in MODEL_MODULES:
        MODEL_MODULES.append(name)


def _import_model_files() -> None:
    for module in list(MODEL_MODULES) + plugin_modules():
        register_module(module)


def plugin_modules() -> list[str]:
    """Methods kept outside the repository: the importable modules named in $MIM_METHODS (comma-separated). Every
    script registers them, and submitit's jobs inherit the variable, so such a method runs through all of them."""
    return [name.strip() for name in os.environ.get(PLUGIN_VARIABLE, "").split(",") if name.strip()]


def list_models(prefix: str = "") -> list[str]:
    """Registered names starting with `prefix`, sorted."""
    _import_model_files()
    return sorted(name for name in _MODELS if name.startswith(prefix))


def pretrain_models() -> list[str]:
    """Every model that some pre-training method owns."""
    _import_model_files()
    return sorted(name for name in _MODELS if any(name.startswith(p) for p in _METHODS))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`; an unknown name is an error that lists the choices."""
    _import_model_files()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def method_for(model_name: str) -> Method:
    """The method owning `model_name` (longest matching prefix)."""
    _import_model_files()
    matches = [p for p in _METHODS if model_name.startswith(p)]
    if not matches:
        raise ValueError(f"{model_name!r} is not a pre-training model; choose one of {pretrain_models()}")
    return _METHODS[max(matches, key=len)]


def other_methods_flags(model_name: str) -> set[str]:
    """The flags of every method but `model_name`'s (knobs it shares with them excepted): a run of that model
    reads none of them, so its args.yaml and checkpoints leave them out."""
    own = {knob.name for knob in method_for(model_name).knobs}
    return {knob.name for method in _METHODS.values() for knob in method.knobs} - own


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Every method's own flags, so that --help documents them all; methods that share knobs (U-MAE and M-MAE)
    share one group."""
    _import_model_files()
    added: dict[int, str] = {}
    for method in _METHODS.values():
        own = tuple(knob for knob in method.knobs if id(knob) not in added)
        if not own:
            continue
        sharing = [m for m in _METHODS.values() if {id(knob) for knob in m.knobs} & {id(knob) for knob in own}]
        title = f"{' and '.join(m.name for m in sharing)} (models {', '.join(m.prefix + '*' for m in sharing)})"
        add_knobs(parser.add_argument_group(title), own)
        added.update((id(knob), method.name) for knob in own)

