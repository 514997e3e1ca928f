"""Named plug-ins: one registry per kind (models, task weightings), filled where each plug-in is defined.

    MODELS = Registry("model", key="model.name")

    @MODELS.register("shared", per_task=False)
    def build_shared(config): ...

Adding a plug-in is one definition and its decorator; the config check, the CLI help and the docs
read the names from the registry. A name can carry facts the engine needs (e.g. per_task: whether
the model is one network per task, trained one after the other as the reference's cascade).

Plug-ins outside the package live in modules of their own, named in $MTL_MENISCUS_PLUGINS (comma-
separated, importable: installed or on PYTHONPATH): the first look-up of any registry imports them,
in every process (the CLI, compare's and tune's workers, torchrun's ranks), so their registrations
are there before a name is read.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from mtl_meniscus.errors import ConfigValueError, MeniscusError

PLUGINS_VARIABLE = "MTL_MENISCUS_PLUGINS"
_plugins_imported = False


def import_plugins() -> None:
    """Import the modules named in $MTL_MENISCUS_PLUGINS, once per process (a MeniscusError naming
    the module when one cannot be imported)."""
    global _plugins_imported
    if _plugins_imported:
        return
    _plugins_imported = True  # first: a plug-in module that reads a registry must not come back here
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as err:  # whatever the module raises, it is the plug-in's failure, named
            _plugins_imported = False  # the next command in this process tries again
            raise MeniscusError(
                f"${PLUGINS_VARIABLE}: cannot import the plug-in module {name!r} ({type(err).__name__}: "
                f"{err}); is it installed, or on PYTHONPATH?"
            ) from None


class Registry:
    """{name: plug-in} with the facts registered beside it, in registration order."""

    def __init__(self, kind: str, key: str):
        self.kind = kind  # 'model', 'task weighting': for messages
        self.key = key  # the config key that names an entry, e.g. 'model.name'
        self._own: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}

    @property
    def _entries(self) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
        """The registrations, after the plug-in modules' (import_plugins)."""
        import_plugins()
        return self._own

    def register(self, name: str, **facts: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register the decorated class or function under `name` (unique)."""

        def add(plugin: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._own:  # not _entries: registering imports no plug-in
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._own[name] = (plugin, facts)
            return plugin

        return add

    def unregister(self, name: str) -> None:
        self._own.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> None:
        """A ConfigValueError naming the config key and the registered names when `name` is not one of them."""
        if name not in self._entries:
            raise ConfigValueError(
                self.key,
                f"config key '{self.key}': unknown {self.kind} {name!r} (registered: {', '.join(self._entries)})",
            )

    def get(self, name: str) -> Callable[..., Any]:
        self.check(name)
        return self._entries[name][0]

    def describe(self, name: str) -> str:
        """The first paragraph of the plug-in's docstring on one line (the CLI help and the docs show it)."""
        paragraph = (self.get(name).__doc__ or "").strip().split("\n\n")[0]
        return " ".join(paragraph.split()).rstrip(".")

    def plugin_module(self, name: str) -> str | None:
        """The module that registered `name` when it is not this package's (a plug-in), else None:
        the contract checks run on plug-ins only, the package's own entries are tested."""
        module = getattr(self.get(name), "__module__", None) or "?"
        return None if module.startswith("mtl_meniscus.") else module

    def facts(self, name: str) -> dict[str, Any]:
        self.check(name)
        return dict(self._entries[name][1])
