"""The stage subprocess: bubblewrap isolation, a scrubbed environment, its own process group,
a timeout, logs. Running a stage's command is kept apart from the run's bookkeeping (as DVC
keeps `dvc/stage/run.py` apart from the Stage object): this module knows nothing of links.

Under bubblewrap a stage sees a root made only of what it needs: the system's read-only
directories, its interpreter and locked environment, chainproof's own packages, its
materials (read-only, as hard links to the very files the runner hashed), its working
directory and scratch (read-write). No key of the workspace, no other run, no repository
root, and no network unless declared.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pipeline.errors import Error, InputError

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

BUBBLEWRAP = "bubblewrap"
INSTALL_HINT = (
    "install bubblewrap: `sudo apt-get install -y bubblewrap` (or `make setup` as root, which "
    "installs it), or run with `chainproof run --no-sandbox` (recorded in run.json and in every "
    "link as sandbox: none)"
)
# Read-only system trees; on merged-/usr systems /bin, /lib, ... are symlinks into /usr and are
# recreated as the same symlinks rather than bound.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Only the /etc files a Python process, its libraries and name resolution read: not the whole
# of /etc (it holds host secrets such as /etc/shadow, which uid 0 in the sandbox could open).
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
)
PROBE_TIMEOUT = 20
# Files bound one by one (those outside the run's hard-link view) beyond which they are bound
# by directory (see coalesce): bubblewrap takes at most 9000 arguments, and its set-up time
# grows with the square of the number of mounts (1,500 binds: tens of seconds).
MAX_BINDS = 200


class SandboxUnavailable(Error):
    """bubblewrap is missing or cannot create namespaces here; nothing ran."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str = INSTALL_HINT) -> None:
        super().__init__(message, hint=hint)


class SandboxRefused(InputError):
    """A path the stage would see lies where no stage may look (the workspace's keys)."""


@dataclass(frozen=True)
class Sandbox:
    """Which isolation runs the stages: bubblewrap at `path`, or none (`--no-sandbox`)."""

    tool: str  # BUBBLEWRAP or "none"
    version: str | None = None
    path: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.tool == BUBBLEWRAP

    def record(self, *, network: bool = False) -> dict[str, Any] | str:
        """What a link's environment and run.json say about the isolation a stage ran under."""
        if not self.enabled:
            return "none"
        return {"tool": self.tool, "version": self.version, "network": network}

    def describe(self) -> dict[str, Any] | str:
        """What run.json says: the tool and version every stage of the run ran under."""
        return {"tool": self.tool, "version": self.version} if self.enabled else "none"


NO_SANDBOX = Sandbox("none")


def find_bubblewrap(search_path: str | None = None) -> Sandbox:
    """bubblewrap on `search_path` (default: $PATH), proven to work by a probe sandbox.

    Raises SandboxUnavailable when it is absent, or present but unable to create namespaces
    (unprivileged user namespaces disabled, a container without CAP_SYS_ADMIN, ...).
    """
    where = search_path if search_path is not None else os.environ.get("PATH", os.defpath)
    found = shutil.which("bwrap", path=where)
    if found is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: not found on PATH {where}")
    bwrap = Path(found)
    try:
        version = subprocess.run(
            [str(bwrap), "--version"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
        probe = subprocess.run(
            [str(bwrap), *_system_args(), "--unshare-all", "--die-with-parent", "--", "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"{bwrap} could not be run: {e}") from e
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no message"]
        raise SandboxUnavailable(
            f"{bwrap} cannot create a sandbox on this machine: {why[0]}",
            hint="enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1"
            " / user.max_user_namespaces), run as root, or run with `chainproof run "
            "--no-sandbox` (recorded in run.json and in every link as sandbox: none)",
        )
    text = version.stdout.strip()
    return Sandbox(BUBBLEWRAP, text.split()[-1] if text else "unknown", bwrap)


@dataclass(frozen=True)
class Mounts:
    """What one stage sees besides the system and its interpreter, each at its own path."""

    read_only: tuple[Path, ...] = ()  # files and directories
    read_write: tuple[Path, ...] = ()
    network: bool = False
    forbidden: tuple[Path, ...] = field(default=())  # never visible, whatever asks for it
    # The run directory: read-only files under it are shown through a private tree of hard
    # links, one bind per top-level directory (see link_view); others are bound one by one.
    anchor: Path | None = None
    # Shown at the working directory's path instead of it (a non-chief training worker's
    # private directory: it sees the stage's layout but cannot write the chief's products).
    workdir_source: Path | None = None


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


# --------------------------------------------------------------------------- what a stage sees


def interpreter_roots(python: Path) -> list[Path]:
    """The directories an interpreter needs: its venv, and the base Python the venv links to.

    Not the directory above either: a venv inside the repository must not expose the
    repository's root (it holds attestations/keys/).
    """
    roots: list[Path] = []
    prefix = Path(os.path.abspath(python)).parent.parent
    cfg = prefix / "pyvenv.cfg"
    if cfg.is_file():
        roots.append(prefix)
        for line in cfg.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                roots.append(Path(value.strip()).resolve().parent)
    real = Path(os.path.realpath(python))
    roots.append(real.parent.parent)
    return list(dict.fromkeys(roots))


def package_dirs(names: Iterable[str]) -> list[Path]:
    """Where top-level packages live (located, not imported: pipeline/ never imports stages/)."""
    out: list[Path] = []
    for name in names:
        spec = find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            out.extend(Path(p) for p in spec.submodule_search_locations)
        elif spec.origin:
            out.append(Path(spec.origin))
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_visible(paths: Iterable[Path], forbidden: Iterable[Path]) -> None:
    """Refuse to show a stage anything inside, or containing, a forbidden directory."""
    bad = [Path(os.path.realpath(f)) for f in forbidden]
    for p in paths:
        real = Path(os.path.realpath(p))
        for f in bad:
            if _inside(real, f) or _inside(f, real):
                raise SandboxRefused(
                    f"{p} would make {f} visible to a stage; stages never see the signing keys",
                    hint="move the input (or the workspace) so that it is not inside "
                    "attestations/keys/, and the keys are not inside it",
                )


def resolve_external(value: str, base_dir: Path, forbidden: Iterable[Path]) -> Path:
    """A stage's declared input outside the run (a `path:` dataset), resolved as the config
    means it (relative to the config's directory, `~` being the user's home, symlinks
    followed); refused when it lies inside a forbidden directory such as the keys."""
    path = Path(os.path.realpath(base_dir / Path(value).expanduser()))
    check_visible([path], forbidden)
    return path


def link_view(
    paths: Iterable[Path], anchor: Path, view: Path
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Hard links of the files under `anchor` in a private tree `view` (outside anything the
    stage sees): ([(view dir, where the stage sees it)], what is left to bind on its own).

    A hard link pins the inode the runner hashed, so a rename over the host path during the
    stage changes nothing the stage reads, and a file added on the host is not in the view —
    with one bind per top-level directory instead of one per file (bubblewrap's cost grows
    with the square of the number of mounts). A file that cannot be linked (another
    filesystem) is bound on its own over an empty stand-in file in the view.
    """
    anchor = Path(os.path.abspath(anchor))
    tops: dict[str, None] = {}
    loose: list[Path] = []
    for path in paths:
        path = Path(os.path.abspath(path))
        try:
            rel = path.relative_to(anchor)
        except ValueError:
            loose.append(path)
            continue
        if len(rel.parts) < 2 or path.is_symlink() or not path.is_file():
            loose.append(path)
            continue
        target = view / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError:
            target.touch()
            loose.append(path)
        tops[rel.parts[0]] = None
    return [(view / t, anchor / t) for t in tops], loose


def coalesce(paths: Iterable[Path], limit: int = MAX_BINDS) -> list[Path]:
    """At most `limit` bind sources covering `paths`: files one by one while they fit (a
    rename over one on the host is then not seen), else whole directories, fullest first.
    A directory bound whole shows renames and new files made in it on the host while the
    stage runs; the re-hash after the stage still catches any change that stays."""
    entries = list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))
    while len(entries) > limit:
        parent, n = Counter(p.parent for p in entries).most_common(1)[0]
        if n == 1:  # every entry alone in its directory: lift the deepest one a level
            parent = max(entries, key=lambda p: len(p.parts)).parent
        entries = [p for p in entries if parent not in p.parents and p != parent] + [parent]
    covered = set(entries)
    return [p for p in entries if not any(a in covered for a in p.parents)]


def _system_args() -> list[str]:
    args: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in ETC_FILES:
        if os.path.lexists(f):
            args += ["--ro-bind-try", f, f]
    return args


def bwrap_args(
    *,
    python: Path,
    workdir: Path,
    scratch: Path,
    mounts: Mounts,
    packages: Sequence[Path],
    view: Sequence[tuple[Path, Path]] = (),
) -> list[str]:
    """bubblewrap's options for one stage (everything before `--` and the command).

    Order matters: bubblewrap applies them in turn, so the read-write directories come
    last, on top of any read-only parent. There is no writable /tmp: TMPDIR and HOME are
    the stage's scratch directory, and everything else (the directories bubblewrap creates
    to hold the binds, /tmp among them) is read-only.
    """
    args = ["--unshare-all", "--die-with-parent", "--new-session"]
    if mounts.network:
        args.append("--share-net")
    args += _system_args()
    args += ["--proc", "/proc", "--dev", "/dev"]
    base = [*interpreter_roots(python), *packages]
    loose = coalesce(mounts.read_only)
    rw = [workdir, scratch, *mounts.read_write]
    if mounts.workdir_source is not None:
        check_visible([mounts.workdir_source], mounts.forbidden)
    check_visible([*base, *loose, *rw, *(p for pair in view for p in pair)], mounts.forbidden)
    for p in dict.fromkeys(Path(os.path.abspath(p)) for p in base):
        args += ["--ro-bind", os.path.realpath(p), str(p)]
    for src, dest in view:
        args += ["--ro-bind", str(src), str(dest)]
    for p in dict.fromkeys(Path(os.path.abspath(p)) for p in loose):
        # Bound at the path the stage uses, from the file it resolves to now: a later
        # rename over the host path does not change what the stage reads.
        args += ["--ro-bind", os.path.realpath(p), str(p)]
    for p in dict.fromkeys(Path(os.path.abspath(p)) for p in rw):
        source = mounts.workdir_source if p == Path(os.path.abspath(workdir)) else None
        args += ["--bind", os.path.realpath(source or p), str(p)]
    # The directories bubblewrap created to hold the binds (../source/ around a bound
    # dataset) live on its root tmpfs; read-only, so a stage cannot add files beside them.
    args += ["--remount-ro", "/", "--chdir", str(workdir)]
    return args


# --------------------------------------------------------------------------- running it


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, 0)  # inheritable only through pass_fds
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _exit_code(status_fd: int) -> int | None:
    """The command's exit code from --json-status-fd, or None when it never ran.

    bubblewrap writes `child-pid` as soon as it forks (before the mounts, which can still
    fail) and `exit-code` only for a command that ran, so only the latter proves a start.
    """
    os.lseek(status_fd, 0, os.SEEK_SET)
    raw = os.read(status_fd, 1 << 16)  # a few hundred bytes, written by bubblewrap itself
    code = None
    decoder = json.JSONDecoder()
    text, pos = raw.decode(errors="replace"), 0
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        if isinstance(doc, dict) and isinstance(doc.get("exit-code"), int):
            code = doc["exit-code"]
    return code


@dataclass
class Started:
    """A stage process under way (see `spawn`): its Popen, and how to read its exit code."""

    proc: subprocess.Popen[bytes]
    logs: StageLogs
    status_fd: int = -1

    def exit_code(self, rc: int) -> int:
        """The command's own exit code (under bubblewrap: from its status, not bubblewrap's).

        Raises SandboxUnavailable when bubblewrap could not set the sandbox up."""
        if self.status_fd < 0:
            return rc
        code = _exit_code(self.status_fd)
        if code is None:
            raise SandboxUnavailable(
                f"bubblewrap could not set up the sandbox (exit {rc}): "
                + (self.logs.tail().splitlines()[-1:] or ["no message"])[0],
                hint="read the stage's stderr log; a material or the workspace in an "
                "unusual place (a special file, a path bubblewrap cannot create) is the "
                "usual cause. Or run with --no-sandbox (recorded)",
            )
        return code

    def kill(self) -> None:
        """SIGKILL its whole process group (bubblewrap's; the sandboxed command dies with it:
        --die-with-parent, and the pid namespace ends with its init)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def spawn(
    argv: list[str],
    *,
    workdir: Path,
    scratch: Path,
    logs: StageLogs,
    sandbox: Sandbox = NO_SANDBOX,
    mounts: Mounts = Mounts(),
    packages: Sequence[Path] | None = None,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[Started]:
    """Start `argv` as `execute` does and yield it running; when the block ends it is killed
    if still alive, and its scratch removed, whatever happened.

    `env`: variables added to the scrubbed environment (a worker's TF_CONFIG). `prefix`: a
    command the sandbox is started through (nsenter into a shared loopback-only network).
    """
    fds: list[int] = []
    status_fd = -1
    view = scratch.with_name(scratch.name + ".view")  # beside the scratch, never bound itself
    started: Started | None = None
    try:
        command = argv
        if sandbox.enabled:
            assert sandbox.path is not None  # an enabled Sandbox comes from find_bubblewrap
            view_binds: list[tuple[Path, Path]] = []
            if mounts.anchor is not None:
                check_visible(mounts.read_only, mounts.forbidden)  # before linking anything
                shutil.rmtree(view, ignore_errors=True)  # never a stale link from a crash
                view_binds, loose = link_view(mounts.read_only, mounts.anchor, view)
                mounts = replace(mounts, read_only=tuple(loose))
            opts = bwrap_args(
                python=Path(argv[0]),
                workdir=workdir,
                scratch=scratch,
                mounts=mounts,
                packages=package_dirs(("pipeline",)) if packages is None else packages,
                view=view_binds,
            )
            status_fd = _memfd("bwrap-status")
            fds.append(status_fd)
            # Options through a file descriptor, not argv: a stage with thousands of
            # material files would otherwise exceed the kernel's argument size limit.
            args_fd = _memfd("bwrap-args", b"".join(a.encode() + b"\0" for a in opts))
            fds.append(args_fd)
            command = [
                *prefix,
                str(sandbox.path),
                "--args",
                str(args_fd),
                "--json-status-fd",
                str(status_fd),
                "--",
                *argv,
            ]
        (scratch / "home").mkdir(parents=True)
        with open(logs.stdout, "wb") as out, open(logs.stderr, "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env={**stage_environment(scratch), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: a timeout kills all of it
                preexec_fn=_die_with_parent,
                pass_fds=fds,
            )
        started = Started(proc, logs, status_fd)
        yield started
    finally:
        if started is not None and started.proc.poll() is None:
            started.kill()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(view, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()  # only when no other stage's scratch is left


def execute(
    argv: list[str],
    *,
    workdir: Path,
    scratch: Path,
    logs: StageLogs,
    timeout: int,
    sandbox: Sandbox = NO_SANDBOX,
    mounts: Mounts = Mounts(),
    packages: Sequence[Path] | None = None,
    watch: Callable[[], None] | None = None,
) -> int | None:
    """Run `argv` in `workdir`; its return code, or None when it timed out and was killed.

    `watch` is called about twice a second while the stage runs, and once after it ended
    (the runner reads the stage's progress from its stdout log there).

    `argv[0]` is the interpreter. Under bubblewrap only what `mounts` names (plus the
    system, the interpreter and chainproof's packages) is visible. `scratch` (HOME, TMPDIR)
    is created here and removed afterwards, whatever happens. Raises SandboxUnavailable when
    bubblewrap could not set the sandbox up (the stage never started).
    """
    with spawn(
        argv,
        workdir=workdir,
        scratch=scratch,
        logs=logs,
        sandbox=sandbox,
        mounts=mounts,
        packages=packages,
    ) as started:
        try:
            rc: int | None = _wait(started.proc, timeout, watch)
        except subprocess.TimeoutExpired:
            started.kill()
            rc = None
        except BaseException:
            started.kill()
            raise
        if rc is not None:
            rc = started.exit_code(rc)
    return rc


def _wait(proc: subprocess.Popen[bytes], timeout: int, watch: Callable[[], None] | None) -> int:
    """`proc.wait(timeout)`, calling `watch` every half second meanwhile and once at the end."""
    if watch is None:
        return proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            rc = proc.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
            watch()
            continue
        watch()
        return rc


def changed_materials(
    before: Mapping[str, Mapping[str, str]], after: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """One line per material that differs after the stage: changed, gone or new."""
    lines = []
    for name in sorted(set(before) | set(after)):
        was = before.get(name, {}).get("sha256")
        now = after.get(name, {}).get("sha256")
        if was != now:
            lines.append(
                f"{name}: sha256 {was or '(absent)'} before the stage, {now or '(absent)'} after"
            )
    return lines
