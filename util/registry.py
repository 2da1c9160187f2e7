"""Registries: models by name (`--model NAME`) and pre-training methods by model-name prefix.

A method (MAE, MI-MAE, ...) is one models file: its factories register with `register_model`, and one
`register_method` call tells main_pretrain.py which flags the method adds and how they become the
factory's keyword arguments. The engine never needs to know the method.
"""
import argparse
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

# Files whose import registers models and methods; a new method adds its file here.
MODEL_MODULES = ("models_mae", "models_vit", "models_mi_mae", "models_m_mae", "models_cmae")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_METHODS: dict[str, "Method"] = {}


@dataclass(frozen=True)
class Method:
    """A pre-training method: models named `<prefix>...`, its own flags, and how flags become model kwargs."""

    name: str
    prefix: str
    model_kwargs: Callable[[argparse.Namespace], dict]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    validate: Optional[Callable[[argparse.Namespace], None]] = None  # raises ValueError naming the flag
    # The name a run's results go under (tools/make_tables.py), from its saved args; e.g. MI-MAE with its MI
    # losses off is the "MAE x 4" control. Default: `name`.
    run_label: Optional[Callable[[dict], str]] = None
    # The method's training samples and between-epoch work, a util.datasets.TrainData subclass built from the
    # args (CMAE: two ContrastiveCrop views). Default: TrainData itself, MAE's one augmented view.
    train_data: Optional[Callable[[argparse.Namespace], object]] = None

    def label(self, args: dict) -> str:
        return self.run_label(args) if self.run_label is not None else self.name


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make `factory` available to `create_model` under its own name."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    _MODELS[factory.__name__] = factory
    return factory


def register_method(method: Method) -> None:
    if method.prefix in _METHODS:
        raise ValueError(f"a method with model prefix {method.prefix!r} is registered twice")
    _METHODS[method.prefix] = method


def _import_model_files() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


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


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Every method's own flags, so that --help documents them all."""
    _import_model_files()
    for method in _METHODS.values():
        if method.add_args is not None:
            method.add_args(parser.add_argument_group(f"{method.name} (models {method.prefix}*)"))
