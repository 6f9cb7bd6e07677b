"""`serve`, `api` and `worker` spell a setting the same way: one flag per setting a person
changes at the command line, with the same name and the same environment variable."""

from __future__ import annotations

import typer

from cleandift.cli import _register_optional_commands, app


def _options(command: str) -> dict[str, tuple[str, str]]:
    """flag -> (the setting's parameter name, its env var) of a command."""
    _register_optional_commands()
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {flag: (param.name, str(param.envvar)) for param in click_command.params
            for flag in param.opts if flag.startswith("--")}


SHARED = {  # flag: the commands that must have it
    "--redis-url": ("serve", "api", "worker"),
    "--log-level": ("serve", "api", "worker"),
    "--log-format": ("serve", "api", "worker"),
    "--tracing": ("serve", "api", "worker"),
    "--worker-port": ("serve", "worker"),
    "--api-workers": ("serve", "api"),
    "--max-queue": ("serve", "api"),
    "--host": ("serve", "api", "worker"),
    "--port": ("serve", "api"),
    "--model": ("serve", "api", "worker"),
    "--max-batch": ("serve", "worker"),
    "--torch-threads": ("serve", "worker"),
    "--redis-cluster": ("serve", "api", "worker"),
    "--queue-partitions": ("serve", "api", "worker"),
}


def test_every_shared_setting_has_one_flag_and_one_variable_everywhere():
    options = {name: _options(name) for name in ("serve", "api", "worker")}
    for flag, commands in SHARED.items():
        seen = {options[c][flag] for c in commands if flag in options[c]}
        assert all(flag in options[c] for c in commands), (flag, commands)
        if flag != "--model":
            assert len(seen) == 1, (flag, seen)
    assert "--port" not in options["worker"]  # the API's port; a worker's is --worker-port
    assert options["api"]["--processes"] == options["api"]["--api-workers"]  # an alias
