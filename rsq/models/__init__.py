"""Model factories by name; importing this package registers them all."""
from . import imagenet, resnet_cifar  # noqa: F401  (registration side effect)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
