"""Running the `lota` command as a separate process, the one way the tests and the scripts do it.

The command is `sys.executable -m lota_cli`, never a path such as `.venv/bin/lota`: the child is then the
same interpreter and environment as the caller (a venv, conda, a CI image, an uninstalled checkout on
PYTHONPATH), and nothing depends on where a console script was installed. The environment is offline, so a
run never waits on or reads from the Hugging Face hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# os.environ plus the settings every lota run from a test or script needs: no hub access, and no tokenizer
# thread pool (it warns and can deadlock once the process forks, e.g. for data loading or a launcher).
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(*args) -> list[str]:
    """The argv of `lota ARGS` run with this interpreter (for callers that need subprocess.Popen)."""
    return [sys.executable, "-m", "lota_cli", *map(str, args)]


class LotaFailed(subprocess.CalledProcessError):
    """A `lota` run that exited non-zero under check=True; its message ends with the tail of stderr, which
    holds lota's one-line error (or the traceback), so a failing test shows why at once."""

    def __str__(self) -> str:
        tail = (self.stderr or "")[-3000:]
        return f"`lota {self.cmd[3] if len(self.cmd) > 3 else ''}` failed (exit {self.returncode}):\n{tail}"


def lota(*args, check: bool = True, env: dict[str, str] | None = None, cwd: str | Path | None = None,
         timeout: float | None = None, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run `lota ARGS` (arguments may be Paths) in a new process with OFFLINE_ENV, updated by `env`.

    stdout is captured as text (a stage prints there only the paths it wrote); stderr too unless `stderr` says
    otherwise (None: let it through to the caller's, as scripts do to show progress). A non-zero exit raises
    LotaFailed unless check=False (for runs that are meant to fail, whose exit status the caller checks).
    """
    result = subprocess.run(command(*args), stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**OFFLINE_ENV, **(env or {})}, cwd=cwd, timeout=timeout)
    if check and result.returncode != 0:
        raise LotaFailed(result.returncode, result.args, result.stdout, result.stderr)
    return result


def in_process(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`lota ARGS` run in this process (lota_cli.cli.main, the function the command runs: composition, the
    stage, the one-line errors), its stdout and stderr captured: the same as lota() less the second or more a
    new interpreter spends importing torch and transformers. Not for what needs a process of its own
    (signals, crashes, several processes, the environment it starts with)."""
    import contextlib
    import io

    from lota_cli import cli

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv[:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = argv
    result = subprocess.CompletedProcess(command(*args), code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise LotaFailed(code, result.args, result.stdout, result.stderr)
    return result


def paths(result: subprocess.CompletedProcess) -> list[Path]:
    """The paths a stage printed: its stdout lines. Each must exist; anything else on stdout breaks the
    contract that lets stages compose in shell pipelines (`mask=$(lota extract ...)`), so it is an error."""
    lines = result.stdout.splitlines()
    stray = [line for line in lines if not line or not Path(line).exists()]
    if stray:
        raise AssertionError(f"stdout must hold only written paths, one per line: {result.stdout!r}")
    return [Path(line) for line in lines]


def saved_bytes(model, fn) -> int:
    """Bytes autograd saves for backward while `fn()` runs (a forward, or forward + backward): distinct storages
    that are not the model's own parameters or buffers, which stay resident whatever autograd keeps."""
    import torch

    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
