"""The plugin manager: built-in parts and entry-point plugins, looked up by name.

Built-ins are ordinary plugins registered through the same hooks as third-party
packages, which declare ``[project.entry-points.vaeguard] name = "module"``. Set the
environment variable ``VAEGUARD_LOAD_PLUGINS`` to a comma-separated list of entry-point
names to load only those (an empty value loads none).

A plugin that fails to load, or fails while registering its parts, does not stop the
others: a lookup that finds its part among the healthy plugins succeeds (loading a model
file needs only the parts it names), and a lookup that does not find it names the plugins
that failed and those installed but left out by ``VAEGUARD_LOAD_PLUGINS``. Listing every
part (``vaeguard plugins``) still raises :class:`PluginError` for a broken plugin.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from vaeguard import hookspecs

#: The kinds of part, each with its registration hook and a singular noun for messages.
PART_KINDS: dict[str, tuple[str, str]] = {
    "encoders": ("vaeguard_register_encoders", "encoder"),
    "likelihoods": ("vaeguard_register_likelihoods", "likelihood"),
    "regularizers": ("vaeguard_register_regularizers", "regularizer"),
    "codecs": ("vaeguard_register_codecs", "codec"),
}

#: Modules holding the built-in parts, registered under these plugin names.
DEFAULT_PLUGINS: dict[str, str] = {
    "vaeguard.encoders": "vaeguard.components.encoders",
    "vaeguard.likelihoods": "vaeguard.components.likelihoods",
    "vaeguard.codecs": "vaeguard.components.codecs",
    "vaeguard.regularizers": "vaeguard.components.regularizers",
}

BUILTIN_SOURCE = "builtin"
ENTRY_POINT_GROUP = "vaeguard"


class PluginError(RuntimeError):
    """A plugin failed to load or to register its parts."""


@dataclass
class PartEntry:
    """One registered part: the object and the plugin that registered it."""

    name: str
    factory: Any
    plugin: str


@dataclass
class PluginInfo:
    """What one plugin is and what it registered."""

    name: str
    source: str
    version: str | None = None
    parts: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "version": self.version, "parts": self.parts}


def make_plugin_manager(*, load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build a fresh plugin manager holding the built-ins (and installed plugins).

    Parameters
    ----------
    load_entrypoints : bool, default=True
        Also load the plugins that installed packages declare in the ``vaeguard``
        entry-point group (filtered by ``VAEGUARD_LOAD_PLUGINS`` when it is set).
    """
    pm = pluggy.PluginManager("vaeguard")
    pm.add_hookspecs(hookspecs)
    for plugin_name, module_name in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(module_name), name=plugin_name)
    if load_entrypoints:
        _load_entrypoints(pm)
    return pm


@dataclass
class Unloaded:
    """Entry-point plugins a manager holds no parts from: ``failed`` (name → why) and ``disabled`` (names
    installed but left out by ``VAEGUARD_LOAD_PLUGINS``)."""

    failed: dict[str, str] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)


def unloaded(pm: pluggy.PluginManager) -> Unloaded:
    """The plugins of ``pm`` that failed to load or were disabled (none for a manager built elsewhere)."""
    return getattr(pm, "vaeguard_unloaded", None) or Unloaded()


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    wanted = os.environ.get("VAEGUARD_LOAD_PLUGINS")
    allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    record = Unloaded()
    pm.vaeguard_unloaded = record
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            record.disabled.append(ep.name)
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # recorded: the other plugins still serve, and a lookup names this one
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            record.failed[ep.name] = f"plugin {ep.name!r} from {dist} failed to load: {exc}"


_GLOBAL_PM: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _GLOBAL_PM
    if _GLOBAL_PM is None:
        _GLOBAL_PM = make_plugin_manager()
    return _GLOBAL_PM


def _plugin_source(pm: pluggy.PluginManager, plugin_name: str) -> tuple[str, str | None]:
    if plugin_name in DEFAULT_PLUGINS:
        from vaeguard import __version__

        return BUILTIN_SOURCE, __version__
    plugin = pm.get_plugin(plugin_name)
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return dist.project_name, dist.version
    return "local", None


class PluginRegistry:
    """Every part the plugins of one manager register, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else get_plugin_manager()

    def _collect(self, kind: str) -> tuple[dict[str, PartEntry], list[str]]:
        """(the parts of one kind by name, the failures of plugins whose registration broke).

        A plugin's parts count only when its whole registration succeeded; a name two
        plugins register is a failure of the second.
        """
        hook_name, noun = PART_KINDS[kind]
        entries: dict[str, PartEntry] = {}
        failures: list[str] = []
        hook = getattr(self.pm.hook, hook_name)
        # In registration order: built-ins first.
        for impl in hook.get_hookimpls():
            mine: dict[str, PartEntry] = {}

            def register(name: str, factory: Any, _plugin: str = impl.plugin_name, _mine: dict = mine) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {noun} with an invalid name {name!r}")
                if name in entries or name in _mine:
                    first = entries[name].plugin if name in entries else _plugin
                    raise PluginError(
                        f"{noun} {name!r} is registered twice: by plugin {first!r} and by plugin {_plugin!r}"
                    )
                _mine[name] = PartEntry(name, factory, _plugin)

            try:
                impl.function(register=register)
            except PluginError as exc:
                failures.append(str(exc))
                continue
            except Exception as exc:
                failures.append(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}")
                continue
            entries.update(mine)
        return entries, failures

    def entries(self, kind: str) -> dict[str, PartEntry]:
        """All parts of one kind (``"encoders"``, ``"likelihoods"``, ...), by name; a ``PluginError`` names a
        plugin that failed to load or to register its parts."""
        if kind not in PART_KINDS:
            raise ValueError(f"unknown kind of part {kind!r}; known kinds: {', '.join(PART_KINDS)}")
        entries, failures = self._collect(kind)
        failures = [*unloaded(self.pm).failed.values(), *failures]
        if failures:
            raise PluginError(failures[0])
        return entries

    def names(self, kind: str) -> list[str]:
        """Sorted names of the parts of one kind."""
        return sorted(self.entries(kind))

    def get(self, kind: str, name: str) -> Any:
        """The factory registered under ``name`` by a healthy plugin (a broken one elsewhere does not matter).

        A ``ValueError`` lists the known names and, where they may be the cause, the plugins
        that failed to load or register and those disabled by ``VAEGUARD_LOAD_PLUGINS``.
        """
        if kind not in PART_KINDS:
            raise ValueError(f"unknown kind of part {kind!r}; known kinds: {', '.join(PART_KINDS)}")
        entries, failures = self._collect(kind)
        if name in entries:
            return entries[name].factory
        noun = PART_KINDS[kind][1]
        known = ", ".join(sorted(entries)) or "(none)"
        message = f"unknown {noun} {name!r}; known {kind}: {known}"
        record = unloaded(self.pm)
        if record.disabled:
            message += f"; installed but disabled by VAEGUARD_LOAD_PLUGINS: {', '.join(record.disabled)}"
        broken = [*record.failed.values(), *failures]
        if broken:
            message += f"; a broken plugin may provide it: {'; '.join(broken)}"
        raise ValueError(message)

    def commands_by_plugin(self) -> dict[str, list[str]]:
        """Which click commands each plugin adds, found by letting it add them to a scratch group."""
        import click

        out: dict[str, list[str]] = {}
        for impl in self.pm.hook.vaeguard_register_commands.get_hookimpls():
            scratch = click.Group("scratch")
            try:
                impl.function(cli=scratch)
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in vaeguard_register_commands: {exc}") from exc
            out[impl.plugin_name] = sorted(scratch.commands)
        return out

    def plugins(self) -> list[PluginInfo]:
        """One :class:`PluginInfo` per plugin, built-ins first."""
        infos: dict[str, PluginInfo] = {}
        for plugin_name, _ in self.pm.list_name_plugin():
            if plugin_name is None:
                continue
            source, version = _plugin_source(self.pm, plugin_name)
            infos[plugin_name] = PluginInfo(plugin_name, source, version, {k: [] for k in [*PART_KINDS, "commands"]})
        for kind in PART_KINDS:
            for entry in self.entries(kind).values():
                infos[entry.plugin].parts[kind].append(entry.name)
        for plugin_name, commands in self.commands_by_plugin().items():
            infos[plugin_name].parts["commands"] = commands
        for info in infos.values():
            for names in info.parts.values():
                names.sort()
        return sorted(infos.values(), key=lambda i: (i.source != BUILTIN_SOURCE, i.name))


def get_registry() -> PluginRegistry:
    """The registry over the process-wide plugin manager."""
    return PluginRegistry(get_plugin_manager())


def get_part(kind: str, name: str) -> Any:
    """Look up a part by kind and name in the process-wide registry."""
    return get_registry().get(kind, name)


def build_part(kind: str, name: str, params: dict[str, Any] | None, what: str) -> Any:
    """The part ``name`` of ``kind`` built with ``params``; parameters it does not take are a ``ValueError``.

    ``what`` names the parameters in the message, e.g. "codec_params".
    """
    factory = get_part(kind, name)
    try:
        return factory(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"{PART_KINDS[kind][1]} {name!r} does not take these {what} ({exc})") from exc


def register_commands(cli: Any, pm: pluggy.PluginManager | None = None) -> None:
    """Let every plugin add its commands to ``cli``."""
    (pm or get_plugin_manager()).hook.vaeguard_register_commands(cli=cli)
