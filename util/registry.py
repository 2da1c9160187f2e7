"""Model registry: factories register under their function name; scripts pick models by `--model NAME`."""
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make `factory` available to `create_model` under its own name."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    _MODELS[factory.__name__] = factory
    return factory


def _import_model_files() -> None:
    # The factories register themselves when their files are imported.
    import models_mae  # noqa: F401
    import models_vit  # noqa: F401


def list_models(prefix: str = "") -> list[str]:
    """Registered names starting with `prefix`, sorted."""
    _import_model_files()
    return sorted(name for name in _MODELS if name.startswith(prefix))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`; an unknown name is an error that lists the choices."""
    _import_model_files()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)
