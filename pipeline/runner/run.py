"""The runner: stages in dependency order, each checked, executed, recorded and signed.

Per stage: environment check against its lock -> spec written -> materials hashed ->
`python -I -m <stage module> ../specs/<stage>.json` in a scrubbed environment with a
timeout -> products hashed -> link signed and written atomically. A failing stage stops the
run and gets no link. Only the runner holds the functionary key; stages never see it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, StageConfig
from pipeline.envcheck import (
    Fingerprint,
    LockFile,
    check_environment,
    ensure_environment,
    parse_lock,
)
from pipeline.errors import InputError, StageFailed
from pipeline.fsutil import atomic_directory, atomic_symlink, atomic_write_bytes, atomic_write_text
from pipeline.hashing import hash_artifacts, list_tree, sha256_file
from pipeline.lineage import LineageError, git_commit, sink_for
from pipeline.provenance import keys as keymod
from pipeline.provenance.chain import DiskArtifacts, VerifyReport, released_steps, verify_chain
from pipeline.provenance.layout import compile_layout, signed_layout_bytes, stage_command
from pipeline.provenance.links import link_filename, read_link, write_link
from pipeline.provenance.openssf import SIGNATURE as MODEL_SIGNATURE
from pipeline.provenance.openssf import sign_model_dir
from pipeline.provenance.statements import slsa_provenance, write_signed_statement
from pipeline.registry import stage_class, stage_module
from pipeline.runner import basemodel
from pipeline.runner.gates import (
    check_dependencies,
    model_scan_statement,
    scan_models,
)
from pipeline.scan.model import UnsafeModelError
from pipeline.workspace import (
    BASE_MODEL,
    CANDIDATE,
    CHECKS_DIR,
    DEPENDENCIES,
    LAYOUT_NAME,
    MODELS,
    PROVENANCE,
    RUN_RECORD,
    UPSTREAM,
    Workspace,
    base_model_name,
    spec_name,
)

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


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the runner dies, so a killed run leaves no orphan
    stage writing into the run behind everyone's back (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the timeout still bounds the stage
        pass


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    links_dir: Path
    release_dir: Path | None
    report: VerifyReport | None
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    lineage: str = ""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_keys(ws: Workspace) -> tuple[keymod.KeyPair, keymod.KeyPair]:
    """Owner and functionary signers; dev keys are created on first use (under a lock)."""
    with _file_lock(ws.keys / ".lock"):
        if not any(os.environ.get(keymod.ENV_URI.format(role=r.upper())) for r in keymod.ROLES):
            keymod.init_dev_keys(ws.keys)
    return keymod.load_signer("owner", ws.keys), keymod.load_signer("functionary", ws.keys)


def release_key_paths(keys_dir: Path) -> tuple[Path, Path] | None:
    """(private, public) of the OpenSSF model-signing key, when there is one."""
    priv = Path(os.environ.get("CHAINPROOF_RELEASE_KEY", keys_dir / keymod.RELEASE_KEY))
    pub = Path(os.environ.get("CHAINPROOF_RELEASE_PUBKEY", keys_dir / keymod.RELEASE_PUB))
    return (priv, pub) if priv.is_file() and pub.is_file() else None


def write_signed_layout(
    config: PipelineConfig,
    owner,
    functionary,
    dest: Path,
    keys_dir: Path,
    extra_checks: tuple[str, ...] = (),
) -> None:
    modules = {s.kind: stage_module(s.kind) for s in config.stages}
    gates = frozenset(s.kind for s in config.stages if getattr(stage_class(s.kind), "gate", False))
    release = release_key_paths(keys_dir)
    layout = compile_layout(
        config,
        functionary=functionary.public,
        modules=modules,
        gates=gates,
        release_key=keymod.release_public_key(release[1].read_bytes()) if release else None,
        extra_checks=extra_checks,
    )
    atomic_write_bytes(dest, signed_layout_bytes(layout, owner.signer))


class Runner:
    """Runs one pipeline config once, in a fresh run directory of the workspace."""

    def __init__(
        self,
        config: PipelineConfig,
        workspace: Workspace,
        *,
        on_event: Callable[[str], None] = lambda _msg: None,
        verify_environment_files: bool = True,
        candidate: bool = False,
    ) -> None:
        self.candidate = candidate  # a candidate's deploy also requires the gate comparison
        self.config = config
        self.ws = workspace
        self.say = on_event
        self.verify_files = verify_environment_files
        self.run_id = new_run_id()
        self.run_dir = workspace.runs / self.run_id
        self.links_dir = workspace.links(self.run_id)
        self.layout_path = self.links_dir / LAYOUT_NAME
        self._locks: dict[Path, LockFile] = {}
        self._fingerprints: dict[Path, Fingerprint] = {}
        self._digest_cache: dict[tuple[int, ...], str] = {}
        self.stage_seconds: dict[str, dict[str, float]] = {}
        self.done: list[str] = []
        self.model_scans: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ run lifecycle

    def locks(self) -> list[Path]:
        return list(
            dict.fromkeys([self.config.lock, *(s.lock for s in self.config.stages if s.lock)])
        )

    def start(self) -> None:
        """Keys, dependency gate, run directory, signed layout. Nothing here runs stage code.

        Everything that can refuse the run (bad lock, a dependency policy violation) happens
        before the run directory exists.
        """
        self.owner, self.functionary = ensure_keys(self.ws)
        for lock in self.locks():
            self.lock_for(lock)
        gate = check_dependencies(
            self.locks(),
            self.config.security.dependencies,
            self.ws.root,
            vex_keys=[self.owner.public],  # VEX counts only when the owner signed it
        )
        for warning in gate.warnings:
            self.say(f"WARNING: {warning}")
        self.say(f"dependency gate: {gate.summary}")
        self.ws.runs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir()  # exclusive: concurrent runs never share a directory
        for sub in ("specs", "logs", "keys", CHECKS_DIR):
            (self.run_dir / sub).mkdir()
        self.links_dir.mkdir(parents=True)
        shutil.copyfile(self.config.path, self.run_dir / "config.yaml")
        (self.run_dir / "locks").mkdir()
        for lock in self.locks():  # the exact locks, for diff and reproduce; digests are in links
            shutil.copyfile(lock, self.run_dir / "locks" / lock.name)
        atomic_write_text(self.run_dir / "keys/owner.pub", self.owner.public.to_json())
        atomic_write_text(self.run_dir / "keys/functionary.pub", self.functionary.public.to_json())
        write_signed_layout(
            self.config,
            self.owner,
            self.functionary,
            self.layout_path,
            self.ws.keys,
            extra_checks=(CANDIDATE,) if self.candidate else (),
        )
        write_signed_statement(self.run_dir / DEPENDENCIES, gate.statement, self.functionary.signer)
        self._record(status="running", dependency_scan=gate.summary)
        atomic_symlink(self.run_id, self.ws.runs / "latest")
        self.say(f"run {self.run_id}: {len(self.config.stages)} stage(s) of '{self.config.name}'")

    def _record(self, **fields: Any) -> None:
        path = self.run_dir / RUN_RECORD
        record = (
            json.loads(path.read_text())
            if path.exists()
            else {
                "run_id": self.run_id,
                "pipeline": self.config.name,
                "config": str(self.config.path),
                "config_sha256": self.config.sha256,
                "links": os.path.relpath(self.links_dir, self.run_dir),
                "layout": os.path.relpath(self.layout_path, self.run_dir),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "stages": [s.name for s in self.config.stages],
                "source_commit": git_commit(self.config.base_dir),
                "config_dir": str(self.config.base_dir),
            }
        )
        record.update(fields)
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def run(self, *, publish: bool = True) -> RunResult:
        try:
            self.start()
            for stage in self.config.stages:
                self.run_stage(stage)
            report = self.verify_run()
            release = self.publish_release() if publish else None
        except BaseException as e:
            if not self.run_dir.is_dir():  # refused before the run existed: nothing to record
                raise
            self._record(status="failed", error=getattr(e, "message", repr(e)))
            if not isinstance(e, KeyboardInterrupt):
                self.log_lineage()
            raise
        self._record(status="succeeded", release=str(release) if release else None)
        lineage = self.log_lineage()
        return RunResult(
            self.run_id, self.run_dir, self.links_dir, release, report, self.stage_seconds, lineage
        )

    def log_lineage(self) -> str:
        """Log the run to MLflow; a failure is reported, recorded, and never fails the run."""
        sink = sink_for(dict(self.config.lineage), self.ws.root, self.config.name)
        t0 = time.perf_counter()
        try:
            result = sink.sync(self.run_dir)
        except LineageError as e:
            self._record(lineage={"logged": False, "error": e.message})
            self.say(f"WARNING: {e.message}\n  {e.hint}")
            return f"NOT logged ({e.hint})"
        self.stage_seconds.setdefault("_lineage", {})["sync"] = time.perf_counter() - t0
        if result is None:
            return "disabled in the config"
        self._record(
            lineage={
                "logged": True,
                "tracking_uri": result.tracking_uri,
                "parent_run_id": result.parent_run_id,
                "model_version": result.model_version,
                "production_alias": result.alias_set,
            }
        )
        alias = ", alias production" if result.alias_set else ""
        version = f", model version {result.model_version}{alias}" if result.model_version else ""
        return f"{result.tracking_uri} (MLflow run {result.parent_run_id}{version})"

    # ------------------------------------------------------------------ environments

    def lock_for(self, path: Path) -> LockFile:
        if path not in self._locks:
            self._locks[path] = parse_lock(path)
        return self._locks[path]

    def environment_for(self, stage: StageConfig) -> tuple[Path, Fingerprint]:
        """(interpreter, fingerprint) for the stage; drift raises EnvironmentDrift."""
        default = self.lock_for(self.config.lock)
        lock = self.lock_for(stage.lock) if stage.lock else default
        if lock.sha256 == default.sha256:
            python = Path(sys.executable)
            fp = check_environment(lock, verify_files=self.verify_files)
        else:
            python = ensure_environment(lock, self.ws.envs, self.say)
            fp = check_environment(lock, python=python, verify_files=self.verify_files)
        return python, fp

    # ------------------------------------------------------------------ one stage

    def _hash(self, named: dict[str, Path]) -> dict[str, dict[str, str]]:
        """Artifact digests; a file unchanged since this run hashed it is not read again."""
        out, todo = {}, {}
        for name, path in named.items():
            st = path.stat()
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key in self._digest_cache:
                out[name] = {"sha256": self._digest_cache[key]}
            else:
                todo[name] = (path, key)
        fresh = hash_artifacts({n: p for n, (p, _) in todo.items()})
        for name, (_, key) in todo.items():
            self._digest_cache[key] = fresh[name]["sha256"]
        out.update(fresh)
        return dict(sorted(out.items()))

    def _spec(self, stage: StageConfig) -> dict[str, Any]:
        lock = stage.lock or self.config.lock
        extra: dict[str, Any] = {
            "config_dir": str(self.config.base_dir),
            "pipeline": self.config.name,
            "locks": [f"../locks/{lock.name}"],
            "lock_sha256": self.lock_for(lock).sha256,
        }
        if getattr(stage_class(stage.kind), "gate", False):
            extra["checks"] = {
                "dependencies": f"../{DEPENDENCIES}",
                "models": f"../{MODELS}",
                **({"candidate": f"../{CANDIDATE}"} if self.candidate else {}),
                "dependencies_required": self.config.security.dependencies.required,
                "functionary_key": str(self.run_dir / "keys/functionary.pub"),
            }
            extra["gate"] = {
                "layout": str(self.layout_path),
                "links": str(self.links_dir),
                "owner_key": str(self.run_dir / "keys/owner.pub"),
                "run_dir": str(self.run_dir),
                "steps": list(self.done),
            }
            extra["release"] = {"name": self.config.name, "version": self.release_version}
        return {
            "run_id": self.run_id,
            "pipeline": self.config.name,
            "stage": stage.name,
            "kind": stage.kind,
            "params": dict(stage.params),
            "inputs": {dep: f"../{dep}" for dep in stage.needs},
            "outputs": list(stage.outputs),
            "extra": extra,
        }

    @property
    def release_version(self) -> str:
        return self.config.release_version or self.run_id

    def run_stage(self, stage: StageConfig) -> Path:
        """Run one stage to a signed link; returns the link's path."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        python, fingerprint = self.environment_for(stage)
        timings["env_check"] = time.perf_counter() - t0

        base = None
        if stage.params.get("base_model"):
            base = basemodel.prepare(
                stage.name, stage.params["base_model"], self.config.base_dir, self.run_dir
            )
            self.model_scans.append(
                {
                    "stage": stage.name,
                    "path": base_model_name(stage.name),
                    "files": [{"path": BASE_MODEL, "sha256": base.sha256}],
                    "findings": [],
                    "max_severity": "none",
                }
            )
            self.say(f"[{stage.name}] base model {base.origin['location']} verified and scanned")
        workdir = self.run_dir / stage.name
        workdir.mkdir()
        spec_path = self.run_dir / spec_name(stage.name)
        spec = self._spec(stage)
        if base is not None:
            spec["extra"]["base_model"] = {
                "path": f"../{base_model_name(stage.name)}",
                "sha256": base.sha256,
            }
        atomic_write_text(spec_path, json.dumps(spec, indent=2, sort_keys=True))

        t0 = time.perf_counter()
        named = {spec_name(stage.name): spec_path}
        named.update(list_tree(self.run_dir / "locks", prefix="locks/"))
        named.update(
            list_tree(self.run_dir / "inputs" / stage.name, prefix=f"inputs/{stage.name}/")
        )
        for dep in stage.needs:
            named.update(list_tree(self.run_dir / dep, prefix=f"{dep}/"))
        if getattr(stage_class(stage.kind), "gate", False):
            write_signed_statement(
                self.run_dir / MODELS,
                model_scan_statement(self.model_scans, self.config.security.models.fail_on),
                self.functionary.signer,
            )
            named.update(list_tree(self.run_dir / CHECKS_DIR, prefix=f"{CHECKS_DIR}/"))
        materials = self._hash(named)
        timings["materials"] = time.perf_counter() - t0

        module = stage_module(stage.kind)
        command = stage_command(module, stage.name)
        self.say(f"[{stage.name}] running {' '.join(command)}")
        t0 = time.perf_counter()
        rc, logs = self._execute(stage, python, [str(python), *command[1:]], workdir)
        timings["execute"] = time.perf_counter() - t0
        if rc != 0:
            reason = "timed out" if rc is None else f"exited with code {rc}"
            raise StageFailed(
                stage.name,
                f"{reason}; no link was written, so nothing it produced counts as attested",
                log_tail=self._tail(logs),
                hint=f"read {logs['stderr']} and fix the cause, then run again",
            )

        t0 = time.perf_counter()
        produced = list_tree(workdir, prefix=f"{stage.name}/")
        missing = [
            o
            for o in stage.outputs
            if not (
                any(n.startswith(f"{stage.name}/{o}") for n in produced)
                if o.endswith("/")  # a directory output: at least one file in it
                else f"{stage.name}/{o}" in produced
            )
        ]
        if missing:
            raise StageFailed(
                stage.name,
                f"exited 0 but did not write its declared output(s) {missing}",
                log_tail=self._tail(logs),
            )
        products = self._hash(produced)
        self.model_scans += self._scan_products(stage, workdir, logs)
        log_digests = self._hash({f"logs/{p.name}": p for p in logs.values()})
        timings["products"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        byproducts = {
            "return-value": rc,
            "stdout": {
                "path": f"logs/{logs['stdout'].name}",
                **log_digests[f"logs/{logs['stdout'].name}"],
            },
            "stderr": {
                "path": f"logs/{logs['stderr'].name}",
                **log_digests[f"logs/{logs['stderr'].name}"],
            },
            "duration_ms": int(timings["execute"] * 1000),
        }
        environment = {
            **fingerprint.as_dict(),
            "determinism": self._determinism(stage),
            **({"base_model": base.origin} if base is not None else {}),
            "stage_environment": "own lock" if stage.lock else "pipeline lock",
            "run_id": self.run_id,
            "config_sha256": self.config.sha256,
        }
        link = write_link(
            self.links_dir,
            name=stage.name,
            materials=materials,
            products=products,
            command=command,
            byproducts=byproducts,
            environment=environment,
            signer=self.functionary.signer,
        )
        timings["sign"] = time.perf_counter() - t0
        self.stage_seconds[stage.name] = timings
        self.done.append(stage.name)
        self.say(
            f"[{stage.name}] ok in {timings['execute']:.1f}s; {len(products)} product(s), "
            f"link {link.name}"
        )
        return link

    @staticmethod
    def is_gate(stage: StageConfig) -> bool:
        return bool(getattr(stage_class(stage.kind), "gate", False))

    def chain_links(self) -> dict[str, Any]:
        """The links written so far, by stage (unverified payloads, for the runner's own use)."""
        kid = self.functionary.public.keyid
        return {s: read_link(self.links_dir / link_filename(s, kid)) for s in self.done}

    def _scan_products(self, stage: StageConfig, workdir: Path, logs) -> list[dict[str, Any]]:
        """Model files a stage produced are scanned before any link calls them good."""
        fail_on = self.config.security.models.fail_on
        try:
            return scan_models(stage.name, workdir, self.run_dir, fail_on)
        except UnsafeModelError as e:
            raise StageFailed(
                stage.name,
                "a model file it produced failed the model scan; no link was written\n"
                + e.diagnostics(),
                log_tail=self._tail(logs),
            ) from e

    @staticmethod
    def _determinism(stage: StageConfig) -> dict[str, Any]:
        switches = dict(getattr(stage_class(stage.kind), "determinism", {}))
        for key, value in switches.items():
            if isinstance(value, str) and value.startswith("params."):
                switches[key] = stage.params.get(value.split(".", 1)[1])
        return switches

    def _execute(
        self, stage: StageConfig, python: Path, argv: list[str], workdir: Path
    ) -> tuple[int | None, dict[str, Path]]:
        tmp = self.run_dir / "tmp" / stage.name
        (tmp / "home").mkdir(parents=True)
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            HOME=str(tmp / "home"),
            KERAS_HOME=str(tmp / "home" / ".keras"),
            TMPDIR=str(tmp),
            LANG="C.UTF-8",
            LC_ALL="C.UTF-8",
            PYTHONHASHSEED="0",
            TF_DETERMINISTIC_OPS="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            CUDA_VISIBLE_DEVICES="",
            MPLBACKEND="Agg",
        )
        logs = {
            "stdout": self.run_dir / "logs" / f"{stage.name}.stdout",
            "stderr": self.run_dir / "logs" / f"{stage.name}.stderr",
        }
        with open(logs["stdout"], "wb") as out, open(logs["stderr"], "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: a timeout kills all of it
                preexec_fn=_die_with_parent,
            )
            try:
                rc: int | None = proc.wait(timeout=stage.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                with contextlib.suppress(OSError):
                    tmp.parent.rmdir()  # only when no other stage's scratch is left
        return rc, logs

    @staticmethod
    def _tail(logs: dict[str, Path]) -> str:
        chunks = []
        for which in ("stderr", "stdout"):
            try:
                lines = logs[which].read_text(errors="replace").splitlines()
            except OSError:
                continue
            if lines:
                chunks.append(f"({which})\n" + "\n".join(lines[-LOG_TAIL_LINES:]))
        return "\n".join(chunks) or "(the stage printed nothing)"

    # ------------------------------------------------------------------ verify and release

    def verify_run(self) -> VerifyReport:
        report = verify_chain(
            layout_path=self.layout_path,
            link_dir=self.links_dir,
            owner=self.owner.public,
            disk=DiskArtifacts(self.run_dir),
            target=str(self.run_dir),
        )
        self.say("verified: the whole chain holds")
        return report

    def write_provenance(self, released: list[str]) -> Path:
        """SLSA provenance v1 for the released model files, signed by the runner's key."""
        from importlib.metadata import version

        links = self.chain_links()
        subjects = {
            name: d["sha256"]
            for step in released
            for name, d in links[step].products.items()
            if name.endswith((".keras", ".h5")) or "/saved_model/" in name
        }
        deps: list[dict[str, Any]] = [
            {
                "name": "config",
                "uri": self.config.path.as_uri(),
                "digest": {"sha256": self.config.sha256},
            },
        ]
        for lock in self.locks():
            deps.append(
                {
                    "name": f"lock:{lock.name}",
                    "uri": lock.as_uri(),
                    "digest": {"sha256": self.lock_for(lock).sha256},
                }
            )
        for step, link in links.items():
            for name, d in link.products.items():
                if name.endswith("/dataset.npz"):
                    manifest = json.loads((self.run_dir / step / "manifest.json").read_text())
                    origin = manifest.get("source", {})
                    deps.append(
                        {
                            "name": f"dataset:{manifest.get('name')}",
                            "uri": str(origin.get("location", name)),
                            "digest": {"sha256": d["sha256"]},
                            "annotations": {
                                "origin_sha256": origin.get("sha256"),
                                "split": manifest.get("split"),
                            },
                        }
                    )
            origin = link.environment.get("base_model")
            if origin:
                deps.append(
                    {
                        "name": f"base_model:{step}",
                        "uri": origin["location"],
                        "digest": {"sha256": origin["sha256"]},
                        "annotations": {
                            k: v for k, v in origin.items() if k not in ("location", "sha256")
                        },
                    }
                )
        commit = json.loads((self.run_dir / RUN_RECORD).read_text()).get("source_commit")
        if commit and commit != "unknown":
            deps.append(
                {
                    "name": "source",
                    "uri": f"git+file://{self.config.base_dir}",
                    "digest": {"gitCommit": commit},
                }
            )
        byproducts = {
            f"attestations/{p.name}": sha256_file(p)
            for p in sorted(self.links_dir.glob("*.link")) + [self.layout_path]
        }
        record = json.loads((self.run_dir / RUN_RECORD).read_text())
        stmt = slsa_provenance(
            subjects=subjects,
            external={
                "pipeline": self.config.name,
                "config": {"path": str(self.config.path), "sha256": self.config.sha256},
            },
            internal={
                "stages": [s.name for s in self.config.stages],
                "layout_sha256": sha256_file(self.layout_path),
            },
            dependencies=deps,
            invocation_id=self.run_id,
            started=record["started"],
            finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            byproducts=byproducts,
            builder_version={"chainproof": version("chainproof")},
        )
        path = self.links_dir / PROVENANCE
        write_signed_statement(path, stmt, self.functionary.signer)
        return path

    def publish_release(self) -> Path | None:
        """Copy the released files, layout, links and public keys into releases/, atomically.

        Published only when the last stage is a deploy stage; the staged bundle is verified
        as a consumer would before it is renamed into place.
        """
        last = self.config.stages[-1]
        if last.kind != "deploy":
            return None
        from pipeline.release.verify import verify_bundle

        released = released_steps(self.layout_path, self.owner.public)
        self.write_provenance(released)
        final = self.ws.root / self.config.release_dir / self.config.name / self.release_version
        if final.exists():
            raise InputError(
                f"release {final} already exists",
                hint="releases are immutable; set a new release.version in the config",
            )
        with atomic_directory(final) as staging:
            (staging / "attestations").mkdir()
            shutil.copyfile(self.layout_path, staging / "attestations" / LAYOUT_NAME)
            for s in self.config.stages:
                name = link_filename(s.name, self.functionary.public.keyid)
                shutil.copyfile(self.links_dir / name, staging / "attestations" / name)
            shutil.copyfile(self.links_dir / PROVENANCE, staging / "attestations" / PROVENANCE)
            shutil.copytree(self.run_dir / CHECKS_DIR, staging / "attestations" / CHECKS_DIR)
            shutil.copytree(self.run_dir / "locks", staging / "locks")
            if (self.run_dir / UPSTREAM).is_dir():
                shutil.copytree(self.run_dir / UPSTREAM, staging / UPSTREAM)
            (staging / "keys").mkdir()
            for role in keymod.ROLES:
                shutil.copyfile(self.run_dir / f"keys/{role}.pub", staging / f"keys/{role}.pub")
            for step in released:
                for name, path in list_tree(self.run_dir / step, prefix=f"{step}/").items():
                    dest = staging / "artifacts" / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)
            release = release_key_paths(self.ws.keys)
            if release:
                shutil.copyfile(release[1], staging / "keys" / keymod.RELEASE_PUB)
                sign_model_dir(
                    staging / "artifacts" / released[0],
                    staging / "attestations" / MODEL_SIGNATURE,
                    release[0],
                )
            (staging / "VERIFY.md").write_text(_verify_md(self, final, released[0]))
            verify_bundle(staging, owner_key=self.owner.public.keyid)
        atomic_symlink(final.name, final.parent / "latest")
        self.say(f"released {final}")
        return final


def _verify_md(runner: Runner, final: Path, model_dir: str) -> str:
    kid = runner.owner.public.keyid
    return f"""# Verifying this release

Release `{runner.config.name}` version `{final.name}`, built by chainproof run `{runner.run_id}`.

Trust comes from the owner's key fingerprint, which you must get from the owner through a
channel other than this bundle:

    owner key fingerprint (sha256 keyid): {kid}

The model directory is also signed in the OpenSSF Model Signing format; its own CLI checks it:

    model_signing verify key artifacts/{model_dir} --signature attestations/model.sig \\
        --public_key keys/release-ec.pub.pem

Check the whole chain offline, with only this directory:

    chainproof verify {final.name} --owner-key {kid}

(run it from the directory that holds this one, or pass the bundle's path). It verifies the
owner's signature on `attestations/root.layout`, that the layout has not expired, that every
step's link is signed by the functionary key the layout names, ran the expected command and
exited 0, that each step's materials match the products of the step before it (from the
dataset's sha256 to the packaged weights), and that every file under `artifacts/` has the
digest its signed link records. Any failure names the check, the step, the rule and the file.
"""
