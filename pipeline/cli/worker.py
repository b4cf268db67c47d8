"""`chainproof worker`: the remote side of `distribution.hosts` (a launcher such as ssh starts
it on a cluster host; the runner is at the other end of its stdin and stdout)."""

from __future__ import annotations

import sys

import click


@click.command()
def worker() -> None:
    """Run one training worker's job read from stdin (sent by `chainproof run`).

    Checks every file of the job against its sha256 and this checkout's environment
    against the job's lock, answers, trains in the sandbox when told to, and writes one
    report to stdout. Closing stdin kills the stage. Exit 0 once the report is sent; 2 a
    job it refuses; 3 environment drift; 4 the runner went away.
    """
    from pipeline.runner import remote

    def say(message: str) -> None:
        click.echo(f"chainproof worker: {message}", err=True)

    code = remote.serve(sys.stdin.fileno(), sys.stdout.buffer, say)
    raise click.exceptions.Exit(code)
