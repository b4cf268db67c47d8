"""The stage subprocess: a scrubbed environment, its own process group, a timeout, logs.

Running a stage's command is kept apart from the run's bookkeeping (as DVC keeps
`dvc/stage/run.py` apart from the Stage object): this module knows nothing of links.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Variables a stage may inherit; everything else in the caller's environment is dropped.
PASS_THROUGH = (
    "OPENBLAS_CORETYPE",  # some CPUs here need these for a correct OpenBLAS
    "OPENBLAS_L2_SIZE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
)
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class StageLogs:
    stdout: Path
    stderr: Path

    def tail(self) -> str:
        """The last lines of both logs, for an error message."""
        chunks = []
        for which, path in (("stderr", self.stderr), ("stdout", self.stdout)):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if lines:
                chunks.append(f"({which})\n" + "\n".join(lines[-LOG_TAIL_LINES:]))
        return "\n".join(chunks) or "(the stage printed nothing)"


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the runner dies, so a killed run leaves no orphan
    stage writing into the run behind everyone's back (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the timeout still bounds the stage
        pass


def stage_environment(scratch: Path) -> dict[str, str]:
    """The only variables a stage sees: nothing of the caller's but proxies and OpenBLAS."""
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env.update(
        PATH="/usr/local/bin:/usr/bin:/bin",
        HOME=str(scratch / "home"),
        KERAS_HOME=str(scratch / "home" / ".keras"),
        TMPDIR=str(scratch),
        LANG="C.UTF-8",
        LC_ALL="C.UTF-8",
        PYTHONHASHSEED="0",
        TF_DETERMINISTIC_OPS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
    )
    return env


def execute(
    argv: list[str], *, workdir: Path, scratch: Path, logs: StageLogs, timeout: int
) -> int | None:
    """Run `argv` in `workdir`; its return code, or None when it timed out and was killed.

    `scratch` (HOME, TMPDIR) is created here and removed afterwards, whatever happens.
    """
    (scratch / "home").mkdir(parents=True)
    with open(logs.stdout, "wb") as out, open(logs.stderr, "wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=stage_environment(scratch),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: a timeout kills all of it
            preexec_fn=_die_with_parent,
        )
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                scratch.parent.rmdir()  # only when no other stage's scratch is left
    return rc
