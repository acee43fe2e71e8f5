"""The `fv-remote` command: a root Typer app with one sub-app per stage."""

from __future__ import annotations

import sys

import typer

from fv_remote.core.errors import UserError

from fv_remote.cli.root import app  # noqa: E402 - the root app, re-exported for `fv_remote.cli.app:app`


@app.callback()
def _options(
    device: str = typer.Option(None, "--device", envvar="FV_REMOTE_DEVICE", show_envvar=True,
                               help="where local models run: cpu, cuda, cuda:N, mps [default: cuda when available, "
                                    "else cpu]"),
    dtype: str = typer.Option(None, "--dtype", envvar="FV_REMOTE_DTYPE", show_envvar=True,
                              help="float32 (default), bfloat16, float16, or auto (the checkpoint's own)"),
    device_map: str = typer.Option(None, "--device-map", envvar="FV_REMOTE_DEVICE_MAP", show_envvar=True,
                                   help="spread a model over devices (accelerate): auto, balanced, sequential, or "
                                        "a JSON object {module: GPU index | \"cpu\" | \"disk\"}"),
    offload_folder: str = typer.Option(None, "--offload-folder", envvar="FV_REMOTE_OFFLOAD", show_envvar=True,
                                       help="where a device map's \"disk\" blocks go [default: the model cache]"),
) -> None:
    """Function vectors in language models: trace heads, rank them, build and steer with FVs.

    The placement options go before the command (`fv-remote --device cuda --dtype bfloat16 extract ...`) and apply
    to every local model the command loads."""
    from fv_remote.cli.common import set_placement

    set_placement(device, dtype, device_map, offload_folder)


def _register() -> None:
    # Sub-commands live in their own modules; importing them attaches them to `app`.
    from fv_remote.cli import data_cmd, extract_cmd, models_cmd, pipeline_cmd, store_cmd  # noqa: F401
    from fv_remote.cli import remote_cmd  # noqa: F401
    from fv_remote.cli import jobs_cmd  # noqa: F401
    from fv_remote.cli import graft_cmd  # noqa: F401
    from fv_remote.cli import align_cmd, analogy_cmd, bank_cmd, decode_cmd, finetune_cmd  # noqa: F401
    from fv_remote.cli import export_cmd  # noqa: F401
    from fv_remote.cli import plan_cmd  # noqa: F401
    from fv_remote.cli import residuals_cmd  # noqa: F401


def _fail(message: str, code: int = 2) -> None:
    # One line, whatever the message quotes (a prompt, a file name with a newline in it).
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    typer.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def main() -> None:
    """Run the app. A user mistake (UserError), or an OSError a user can fix (permissions, full disk, a file in
    the way), ends with one `error:` line and exit 2; Ctrl-C with one line saying what was kept and exit 130;
    anything else is a bug and keeps its traceback."""
    from fv_remote.core.checks import kept_line, reset_kept

    _register()
    reset_kept()
    try:
        app()
    except UserError as exc:
        _fail(str(exc))
    except OSError as exc:
        from fv_remote.core.errors import os_error_message

        target = exc.filename or "a file"
        message = os_error_message(exc, str(target), "write" if exc.filename else "access")
        if message is None and isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"{exc.filename}: no such file or folder"
        if message is None:
            raise
        _fail(message)
    except KeyboardInterrupt:  # raised outside typer's own handling (e.g. while it starts)
        typer.secho(f"interrupted: {kept_line()}", fg="yellow", err=True)
        sys.exit(130)
    except SystemExit as stop:
        if stop.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.secho(f"interrupted: {kept_line()}", fg="yellow", err=True)
        raise
