"""llmcompressor's ``ModifierFactory``: which modifiers are registered by name.

The factory keeps the modifiers registered at run time (``ModifierFactory.register``,
as ours are) in a private dict; the lazy package import asks it before importing
our modifier module for a recipe that names it."""

from __future__ import annotations

__all__ = ["is_registered"]


def is_registered(factory: type, name: str) -> bool:
    return name in factory._registered_registry
