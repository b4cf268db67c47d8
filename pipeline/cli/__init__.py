"""The `chainproof` command: parse, one library call, render. Errors are caught only here.

Exit codes: 0 ok, 1 verification failed, 2 bad input or config, 3 environment drift,
4 a stage failed, 5 could not scan (no usable vulnerability database),
6 lineage not logged (MLflow unreachable), 70 an internal error (a bug: please report it
with the traceback).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import click

from pipeline.errors import Error

EXIT_BUG = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chainproof")
def cli() -> None:
    """Reproducible ML pipelines whose every stage leaves a signed in-toto link."""


@click.group("scan")
def scan_group() -> None:
    """Security scans: dependencies against an offline OSV database, model files, data."""


def _register() -> None:
    from pipeline.cli import compare, data, release, run, worker
    from pipeline.cli import scan as scans

    for command in (
        run.run,
        run.status,
        release.verify,
        run.layout,
        run.keys,
        run.env,
        release.show,
        run.lineage,
        run.reproduce,
        release.serve,
        release.release,
        run.candidate,
        scan_group,
        scans.deps,
        compare.diff,
        scans.vulndb,
        data.data_group,
        worker.worker,
    ):
        cli.add_command(command)
    scan_group.add_command(scans.scan_deps, name="deps")
    scan_group.add_command(scans.scan_model, name="model")
    scan_group.add_command(scans.scan_data, name="data")


_register()


def _terminate(signum: int, _frame) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so runs record "failed", kill their stage and
    # remove staging directories instead of dying mid-step with "running" on disk.
    raise KeyboardInterrupt(f"signal {signum}")


def run_cli(args: list[str] | None = None) -> int:
    """Run one command; the exit code. The one place a chainproof error becomes an exit."""
    from pipeline import envmanifest

    try:
        cli.main(args=args, standalone_mode=False)
        envmanifest.settle_all()  # a deferred walk no command waited for: drift still exits 3
    except Error as e:
        click.echo(
            f"error: {e.diagnostics()}" if not hasattr(e, "check") else e.diagnostics(), err=True
        )
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception:  # a bug, not a user error: keep its traceback, give it its own code
        traceback.print_exc()
        click.echo(
            "chainproof: internal error (exit 70); please report the traceback above", err=True
        )
        return EXIT_BUG
    finally:
        envmanifest.abandon()  # a command that failed before waiting for it: no orphan walk
    return 0


def main() -> None:
    from pipeline import envmanifest

    if not envmanifest.bootstrapped():
        # Started some other way (pip's console script, `python -m pipeline`): by now site,
        # PYTHONPATH and every .pth may have run, so start over isolated, checked first.
        cmd = envmanifest.isolated_command(sys.executable)
        os.execv(cmd[0], [*cmd, *sys.argv[1:]])
    # Only serve imports TensorFlow here; 3 also hides its C++ ERROR lines such as "failed
    # call to cuInit" on a machine without a GPU (the stages' own go to their logs).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # see options.log_third_party
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    _exit_now(run_cli())


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: after a command that imported MLflow it costs
    1-4 s (SQLAlchemy's engines and atexit hooks, then collecting thousands of modules).
    Nothing is lost: every file chainproof writes is fsynced and renamed when it is written
    (fsutil), every pool and temporary directory is closed by its `with`, and what Python
    still buffers (stdio, logging handlers) is flushed here first."""
    import contextlib
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`chainproof ... | head`)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
