"""Run `fv-remote` in this process (fast enough for fuzzing) and make a tiny model folder the CLI can load.

`invoke(*args)` calls the real entry point (`fv_remote.cli.app.main`) with stdout/stderr captured and returns
the exit code, the two streams and any exception that escaped `main` (an escaped exception is what a user sees
as a traceback).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def traceback(self) -> bool:
        return self.exception is not None or "Traceback (most recent call last)" in self.stderr

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def invoke(*args: str, cwd: str | Path | None = None) -> Result:
    from fv_remote.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["fv-remote", *map(str, args)]
    code, exc = 0, None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException as escaped:  # noqa: BLE001 - this is what the test looks for
                exc, code = escaped, 1
                traceback.print_exc(file=err)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Result(code, out.getvalue(), err.getvalue(), exc)


def one_error_line(result: Result, *needles: str) -> str:
    """Assert exit 2 with exactly one `error:` line last on stderr (no traceback); return that line."""
    assert not result.traceback, result.describe()
    assert result.code == 2, result.describe()
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.describe()
    assert sum(line.startswith("error:") for line in lines) == 1, result.describe()
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def save_tiny_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny random model + tokenizer saved as a transformers folder (`--model FOLDER` loads it offline)."""
    from conftest import _tiny_tokenizer, make_tiny_model

    tok = _tiny_tokenizer()
    model = make_tiny_model(family, tok, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
