"""The click command group: plugins listing, demo, plugin commands."""

import json

import click
import pytest
from click.testing import CliRunner

from vaeguard import hookimpl
from vaeguard.cli import cli
from vaeguard.plugins import make_plugin_manager, register_commands


def test_plugins_json_lists_builtins_and_the_studentt_package():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = {p["name"]: p for p in json.loads(result.output)}
    assert listing["vaeguard.likelihoods"]["source"] == "builtin"
    assert set(listing["vaeguard.likelihoods"]["parts"]) == {
        "encoders",
        "likelihoods",
        "regularizers",
        "codecs",
        "commands",
    }
    assert "gaussian" in listing["vaeguard.likelihoods"]["parts"]["likelihoods"]
    assert listing["studentt"]["source"] == "vaeguard-studentt"
    assert listing["studentt"]["parts"]["likelihoods"] == ["studentt"]


def test_plugins_table():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["plugin", "source", "version"]
    assert any(line.startswith("studentt") and "vaeguard-studentt" in line for line in lines)


def test_plugins_add_commands():
    class Greeter:
        @hookimpl
        def vaeguard_register_commands(self, cli):
            @cli.command(name="greet")
            def greet():
                click.echo("hello from a plugin")

    group = click.Group("vaeguard-test")
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Greeter(), name="greeter")
    register_commands(group, pm)
    result = CliRunner().invoke(group, ["greet"])
    assert result.exit_code == 0 and "hello from a plugin" in result.output


def test_demo_runs_and_reports(monkeypatch):
    result = CliRunner().invoke(cli, ["demo", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "most anomalous" in result.output
    auroc = float(result.output.split("AUROC ")[1].split()[0])
    assert auroc > 0.9  # thyroid: the likelihood separates hyperfunction cases well


def test_demo_unknown_dataset_is_a_usage_error():
    result = CliRunner().invoke(cli, ["demo", "--dataset", "nope"])
    assert result.exit_code == 2
    assert "unknown data set 'nope'" in result.output


def test_a_broken_plugin_is_one_line_and_exit_code_2(monkeypatch):
    from vaeguard import cli as cli_module

    class Broken:
        @hookimpl
        def vaeguard_register_likelihoods(self, register):
            raise RuntimeError("cannot import torch_extras")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Broken(), name="broken-plugin")
    monkeypatch.setattr(cli_module, "get_plugin_manager", lambda: pm)
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 2
    assert "plugin 'broken-plugin' failed in vaeguard_register_likelihoods: cannot import torch_extras" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "options, named",
    [
        (["--explain"], "--explain"),
        (["--resume"], "--resume"),
        (["--on-bad-row", "skip"], "--on-bad-row"),
        (["--chunk-rows", "500"], "--chunk-rows"),
        (["--progress"], "--progress/--no-progress"),
        (["--explain", "--resume"], "--explain, --resume are"),
    ],
)
def test_score_with_dask_refuses_each_option_it_would_not_honour(tmp_path, options, named):
    """Under --engine dask an option works as locally or is refused with one line (exit 2), never ignored."""
    model = tmp_path / "m.h5"
    model.write_bytes(b"not read: refused before the model is opened")
    result = CliRunner().invoke(
        cli, ["score", str(model), "part-*.csv", "-o", str(tmp_path / "out.csv"), "--engine", "dask", *options]
    )
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "not available with --engine dask" in result.stderr
    assert "Traceback" not in result.output


def test_score_with_dask_accepts_the_defaults_spelled_out(tmp_path):
    """--on-bad-row error is what a Dask job does (a bad row stops it): accepted, like every default."""
    model = tmp_path / "m.h5"
    model.write_bytes(b"x")
    result = CliRunner().invoke(
        cli,
        ["score", str(model), str(tmp_path / "none-*.csv"), "-o", "o.csv", "--engine", "dask", "--on-bad-row", "error"],
    )
    assert "not available with --engine dask" not in result.stderr


def test_version_and_a_commands_help_do_not_import_torch():
    # issue 19: every call paid 7 s and 376 MB for torch, even --version
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vaeguard.cli import cli\n"
        "for args in (['--version'], ['fit', '--help'], ['score', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plugin_commands_are_found_when_named():
    from vaeguard import cli as cli_module

    class Greeter:
        @hookimpl
        def vaeguard_register_commands(self, cli):
            @cli.command(name="greet-lazily")
            def greet():
                click.echo("hello")

    group = cli_module._CommandGroup("vaeguard-test", commands={"version": click.Command("version")})
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Greeter(), name="greeter")
    original = cli_module.register_commands
    cli_module.register_commands = lambda target: original(target, pm)
    try:
        assert "greet-lazily" not in group.commands  # nothing loaded yet
        result = CliRunner().invoke(group, ["greet-lazily"])
        assert result.exit_code == 0 and result.output == "hello\n"
        assert "greet-lazily" in group.list_commands(click.Context(group))
    finally:
        cli_module.register_commands = original
