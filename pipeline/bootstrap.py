"""`python -I -S pipeline/bootstrap.py ARGS`: check site-packages with the standard library
alone, and only then let site-packages in and start the chainproof CLI.

Run by path, not with -m: under -I -S nothing outside the standard library is importable,
which is the point. Drift exits 3 before a single third-party module has been imported.
"""

from __future__ import annotations

import argparse
import os
import sys


def _enter_prefix(venv: str) -> None:
    # What site.venv() would have done: sysconfig and the runner derive site-packages from
    # sys.prefix, so it must name the venv before anything reads sysconfig.
    sys.prefix = sys.exec_prefix = venv


def _seal(argv: list[str], venv: str) -> int:
    from pathlib import Path

    from pipeline import envmanifest

    ap = argparse.ArgumentParser(prog="chainproof env seal")
    ap.add_argument("--lock", default="requirements/main.txt", help="the lock it was built from")
    ap.add_argument("--force", action="store_true", help="re-seal an already sealed environment")
    ap.add_argument("--no-compile", action="store_true", help="keep the existing .pyc files")
    args = ap.parse_args(argv)
    dest = envmanifest.seal(
        Path(venv), Path(args.lock), force=args.force, compile_pyc=not args.no_compile
    )
    envmanifest.install_wrapper(Path(venv))
    print(f"sealed {dest} (lock {args.lock}; key {envmanifest.seal_key_path()})")
    return 0


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    try:
        from pipeline import envmanifest
        from pipeline.errors import EnvironmentDrift, Error
    finally:
        sys.path.remove(root)
    venv = envmanifest.venv_of(sys.executable)
    _enter_prefix(str(venv))
    argv = sys.argv[1:]
    try:
        if not envmanifest.is_venv(venv):
            raise EnvironmentDrift(
                str(venv),
                [f"- {sys.executable}: not the interpreter of a locked virtualenv"],
                hint="run chainproof from the environment `make setup` built: .venv/bin/chainproof",
            )
        if argv[:2] == ["env", "seal"]:
            sys.exit(_seal(argv[2:], str(venv)))
        # `run` checks the DEFERRED packages (TensorFlow, MLflow, ...) in the background when
        # the stamp answers: it imports none of them before its environment check waits.
        result = envmanifest.check_tree(venv, defer=argv[:1] == ["run"])
        if result.diff:
            raise EnvironmentDrift(str(venv / envmanifest.MANIFEST_NAME), list(result.diff))
    except Error as e:
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        sys.exit(e.exit_code)
    envmanifest.remember(result)
    envmanifest.mark_bootstrapped()
    import site

    site.addsitedir(str(envmanifest.site_packages(venv)))
    from pipeline.cli import main as cli_main

    sys.argv[0] = "chainproof"
    cli_main()


if __name__ == "__main__":
    main()
