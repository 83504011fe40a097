"""The plugin manager: built-ins through the hooks, duplicates, unknown names, entry points."""

import click
import pytest

from vaeguard import hookimpl
from vaeguard.components.likelihoods import GaussianLikelihood
from vaeguard.plugins import PluginError, PluginRegistry, make_plugin_manager


class DuplicateGaussian:
    @hookimpl
    def vaeguard_register_likelihoods(self, register):
        register("gaussian", GaussianLikelihood)


class ThirdParty:
    @hookimpl
    def vaeguard_register_likelihoods(self, register):
        register("mine", GaussianLikelihood)

    @hookimpl
    def vaeguard_register_codecs(self, register):
        register("zip", object)

    @hookimpl
    def vaeguard_register_commands(self, cli):
        @cli.command(name="hello")
        def hello():
            click.echo("hi")


class Broken:
    @hookimpl
    def vaeguard_register_encoders(self, register):
        raise RuntimeError("boom")


def fresh() -> PluginRegistry:
    return PluginRegistry(make_plugin_manager(load_entrypoints=False))


def test_builtins_register_through_the_hooks():
    reg = fresh()
    assert reg.names("encoders") == ["conv", "mlp", "temporal"]
    assert reg.names("likelihoods") == [
        "bernoulli",
        "categorical",
        "diag_gaussian",
        "discretized_logistic",
        "gaussian",
        "mixed",
    ]
    assert reg.get("likelihoods", "gaussian") is GaussianLikelihood
    infos = {i.name: i for i in reg.plugins()}
    assert infos["vaeguard.likelihoods"].source == "builtin"
    assert infos["vaeguard.encoders"].parts["encoders"] == ["conv", "mlp", "temporal"]
    assert reg.names("regularizers") == ["beta", "factor", "tc"]
    assert infos["vaeguard.regularizers"].source == "builtin"


def test_duplicate_name_names_both_plugins():
    reg = fresh()
    reg.pm.register(DuplicateGaussian(), name="dupe-plugin")
    with pytest.raises(
        PluginError,
        match="'gaussian' is registered twice: by plugin 'vaeguard.likelihoods' and by plugin 'dupe-plugin'",
    ):
        reg.names("likelihoods")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown likelihood 'gausian'; known likelihoods: bernoulli, categorical, diag_gaussian, "
        "discretized_logistic, gaussian, mixed",
    ):
        fresh().get("likelihoods", "gausian")
    with pytest.raises(ValueError, match="unknown kind of part"):
        fresh().names("widgets")


def test_third_party_parts_and_commands_are_reported():
    reg = fresh()
    reg.pm.register(ThirdParty(), name="third")
    assert "mine" in reg.names("likelihoods")
    info = {i.name: i for i in reg.plugins()}["third"]
    assert info.source == "local"
    assert info.parts == {
        "encoders": [],
        "likelihoods": ["mine"],
        "regularizers": [],
        "codecs": ["zip"],
        "commands": ["hello"],
    }


def test_a_broken_plugin_is_named():
    reg = fresh()
    reg.pm.register(Broken(), name="broken-plugin")
    with pytest.raises(PluginError, match="plugin 'broken-plugin' failed in vaeguard_register_encoders: boom"):
        reg.names("encoders")


def test_entry_point_plugins_load_with_their_distribution(monkeypatch):
    reg = PluginRegistry(make_plugin_manager())
    info = {i.name: i for i in reg.plugins()}
    assert info["studentt"].source == "vaeguard-studentt"
    assert info["studentt"].parts["likelihoods"] == ["studentt"]
    monkeypatch.setenv("VAEGUARD_LOAD_PLUGINS", "")
    assert "studentt" not in PluginRegistry(make_plugin_manager()).names("likelihoods")
    monkeypatch.setenv("VAEGUARD_LOAD_PLUGINS", "studentt")
    assert "studentt" in PluginRegistry(make_plugin_manager()).names("likelihoods")


def test_a_broken_plugin_does_not_stop_lookups_of_other_parts():
    """Only the listing of every part fails; a lookup finds a healthy plugin's part, and a lookup that
    fails names the broken plugin as a possible provider."""
    reg = fresh()
    reg.pm.register(Broken(), name="broken-plugin")
    assert reg.get("encoders", "mlp") is not None
    with pytest.raises(ValueError, match="a broken plugin may provide it: plugin 'broken-plugin' failed"):
        reg.get("encoders", "fancy")


def test_an_entry_point_that_fails_to_load_is_recorded_not_raised(monkeypatch):
    import pluggy

    def fail(self, group, name=None):
        raise ImportError("no module named 'missing_dependency'")

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", fail)
    reg = PluginRegistry(make_plugin_manager())
    assert reg.get("likelihoods", "diag_gaussian") is not None
    with pytest.raises(ValueError, match=r"plugin 'studentt' from vaeguard-studentt failed to load: no module"):
        reg.get("likelihoods", "studentt")
    with pytest.raises(PluginError, match="plugin 'studentt'"):
        reg.names("likelihoods")


def test_a_plugin_disabled_by_the_environment_is_named_as_disabled(monkeypatch):
    monkeypatch.setenv("VAEGUARD_LOAD_PLUGINS", "")
    reg = PluginRegistry(make_plugin_manager())
    with pytest.raises(ValueError, match="installed but disabled by VAEGUARD_LOAD_PLUGINS: studentt"):
        reg.get("likelihoods", "studentt")
