"""Importing this package registers every ``copydet`` sub-command in :data:`COMMANDS`."""
import importlib
import pkgutil

from jobs.commands.base import COMMANDS

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["COMMANDS"]
