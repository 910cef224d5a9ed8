"""Generative models, one file per family, and a registry by name.

A model class registers itself with the :func:`register` decorator::

    @register
    class MyModel(ShowerModel):
        name = "my-model"

Built-in modules are imported lazily on the first registry query, each on its own:
a module that is absent is skipped, and one that fails to import (a missing optional
dependency, a bug) does not hide the others; its error is reported when its model is
asked for.

Each model's hyper-parameters are a frozen dataclass (:class:`ModelConfig` subclass,
``cls.config_class``, see :func:`get_config_class`); :func:`build_model` takes one, or a
mapping of its keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fastshower.errors import FastshowerError
from fastshower.models.base import ModelConfig, ModelSpec, ShowerModel

__all__ = [
    "DEFAULT_MODEL",
    "ModelConfig",
    "ModelSpec",
    "ShowerModel",
    "UnknownModelError",
    "available_models",
    "build_model",
    "get_config_class",
    "get_model_class",
    "register",
]

#: the model ``fastshower train`` uses when none is named
DEFAULT_MODEL = "flow-matching"

# module -> model name it is expected to register (the name is only used in error messages)
_BUILTIN_MODULES: dict[str, str] = {
    "flow_matching": "flow-matching",
    "vae": "vae",
    "wgan": "wgan-gp",
    "calogan": "calogan",
    "flow": "flow",
    "onestep": "one-step",
    "layer_fm": "layer-fm",
    "gan3d": "3dgan",
}

_REGISTRY: dict[str, type[ShowerModel]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_loaded = False


class UnknownModelError(FastshowerError, ValueError):
    """A model name that no registered model has."""


def register(cls: type[ShowerModel]) -> type[ShowerModel]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, ShowerModel)):
        raise TypeError(f"register() expects a ShowerModel subclass, got {cls!r}")
    name = cls.name
    if not name or name == ShowerModel.name:
        raise ValueError(f"{cls.__qualname__} must set a class attribute 'name'")
    other = _REGISTRY.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"model name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module, model_name in _BUILTIN_MODULES.items():
        full = f"{__name__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                continue  # the file does not exist (yet): nothing to register
            _IMPORT_ERRORS[model_name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a broken model module must not take the others down
            _IMPORT_ERRORS[model_name] = f"{type(exc).__name__}: {exc}"


def available_models(include_derived: bool = False) -> list[str]:
    """Names of the registered models that train on showers, the default first.

    ``include_derived`` adds the models made from another run (``trainable = False``, e.g. the
    one-step student of ``fastshower distill``), which :func:`get_model_class` also finds.
    """
    _load_builtins()
    names = [n for n, c in _REGISTRY.items() if include_derived or c.trainable]
    return sorted(names, key=lambda n: (n != DEFAULT_MODEL, n))


def get_model_class(name: str) -> type[ShowerModel]:
    """The model class registered as ``name``; :class:`UnknownModelError` lists the choices."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _IMPORT_ERRORS:
        raise UnknownModelError(f"model {name!r} failed to import ({_IMPORT_ERRORS[name]})")
    raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(available_models()) or 'none'}")


def get_config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of model ``name`` (:class:`UnknownModelError` for an unknown name)."""
    return get_model_class(name).config_class


def build_model(name: str, spec: ModelSpec, config: ModelConfig | Mapping[str, Any] | None = None) -> ShowerModel:
    """Instantiate model ``name`` for ``spec`` with ``config``: its config, or a mapping of some of its keys
    (the others keep their defaults; names of earlier releases are accepted).

    Raises:
        UnknownModelError: no model has that name.
        fastshower.errors.ConfigError: an unknown key (the message names the model and lists the known keys)
            or a value of the wrong kind.
    """
    return get_model_class(name)(spec, config)
