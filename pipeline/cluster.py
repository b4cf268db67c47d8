"""What a `distribution.hosts` cluster config may say: strict host:port, the launcher argv
that starts a remote worker, and the checkout it runs from. Standard library only: the
train stage's params validate with it when a config loads."""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence

HOST_PLACEHOLDER = "{host}"
MAX_LAUNCHER_ARGS = 64
MAX_ARG_CHARS = 4096
# One DNS label (RFC 1123): letters, digits, inner hyphens. Never a leading "-": a host is
# substituted into the launcher's argv, where "-oProxyCommand=..." would be an ssh option.
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# A remote checkout goes into the remote shell's command line (ssh joins its arguments):
# an absolute path of plain characters only, quoted as well.
_CHECKOUT = re.compile(r"^/[A-Za-z0-9._/+-]{0,1023}$")


class ClusterConfigError(ValueError):
    """A host, launcher or checkout the config cannot use (a ValueError: pydantic reports it
    at the config's line)."""


def parse_host(entry: str) -> tuple[str, int]:
    """("host", port) from "host:port", "1.2.3.4:port" or "[v6]:port"; anything else raises.

    Strict on purpose: the host part reaches a launcher's argv and TensorFlow's cluster spec."""
    if not isinstance(entry, str) or len(entry) > 300:
        raise ClusterConfigError(f"host {str(entry)[:80]!r} is not host:port")
    host, sep, port = entry.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterConfigError(f"host {entry!r} is not host:port (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ClusterConfigError(f"host {entry!r}: {host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    try:
        ipaddress.IPv4Address(host)
        return host, int(port)
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ClusterConfigError(
            f"host {entry!r}: {host!r} is not a hostname, IPv4 address or [IPv6] address"
        )
    return host, int(port)


def check_hosts(hosts: Sequence[str], workers: int) -> list[tuple[str, int]]:
    """Every entry parsed; one per worker, the chief first, no address named twice."""
    if len(hosts) != workers:
        raise ClusterConfigError(f"hosts names {len(hosts)} worker(s) but workers is {workers}")
    parsed = [parse_host(h) for h in hosts]
    seen = set()
    for h, (host, port) in zip(hosts, parsed, strict=True):
        if (host.lower(), port) in seen:
            raise ClusterConfigError(f"host {h!r} is named twice: each worker needs its own port")
        seen.add((host.lower(), port))
    return parsed


def check_launcher(launcher: Sequence[str]) -> tuple[str, ...]:
    """A launcher is an argv prefix run without a shell; only `{host}` is substituted."""
    if not 0 < len(launcher) <= MAX_LAUNCHER_ARGS:
        raise ClusterConfigError(f"launcher needs 1 to {MAX_LAUNCHER_ARGS} arguments")
    for arg in launcher:
        if not isinstance(arg, str) or not arg or len(arg) > MAX_ARG_CHARS or "\0" in arg:
            raise ClusterConfigError(f"launcher argument {str(arg)[:80]!r} is empty or too long")
    return tuple(launcher)


def check_checkout(path: str) -> str:
    if not _CHECKOUT.match(path) or ".." in path.split("/"):
        raise ClusterConfigError(
            f"remote_checkout {path[:80]!r} must be an absolute path of letters, digits and "
            "._/+- (it becomes part of the remote shell's command line)"
        )
    return path


def default_launcher(checkout: str) -> tuple[str, ...]:
    """ssh without prompts (BatchMode: keys or an agent, never a password on stdin, which
    carries the job), no tty (the job is binary), `--` so no host can be read as an option."""
    remote = (
        f"cd {shlex.quote(check_checkout(checkout))} && exec .venv/bin/python -I -m pipeline worker"
    )
    return ("ssh", "-o", "BatchMode=yes", "-T", "--", HOST_PLACEHOLDER, remote)


def launcher_argv(launcher: Sequence[str], host: str) -> list[str]:
    """The argv that starts the worker on `host` (already parsed, so it holds no option)."""
    return [arg.replace(HOST_PLACEHOLDER, host) for arg in launcher]
