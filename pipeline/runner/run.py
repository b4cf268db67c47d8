"""One run's lifecycle: start -> stages -> verify -> publish, every failure recorded in one place.

Per stage: environment check against its lock -> spec written -> materials hashed ->
`python -I -m <stage module> ../specs/<stage>.json` under bubblewrap, in a scrubbed
environment with a timeout (runner/sandbox.py) -> materials re-hashed (a change fails the
stage) -> products hashed and model files scanned -> link signed and written atomically. A
failing stage stops the run and gets no link. Only the runner holds the functionary key;
stages never see it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import envmanifest
from pipeline.codedigest import git_state, package_dir
from pipeline.config import PipelineConfig, StageConfig
from pipeline.envcheck import (
    Fingerprint,
    LockFile,
    check_environment,
    ensure_environment,
    parse_lock,
)
from pipeline.errors import StageFailed
from pipeline.fsutil import atomic_symlink, atomic_write_text
from pipeline.hashing import hash_artifacts, list_tree
from pipeline.lineage import git_commit
from pipeline.provenance import openssf
from pipeline.provenance.chain import DiskArtifacts, VerifyReport, verify_chain
from pipeline.provenance.keys import KeyPair, PublicKey, TrustedOwner, release_public_key
from pipeline.provenance.layout import stage_command
from pipeline.provenance.links import Link, link_filename, read_link, write_link
from pipeline.provenance.statements import write_signed_statement
from pipeline.release.publish import ReleaseInputs, publish
from pipeline.runner import detached, distributed, sandbox, uptodate
from pipeline.runner.gates import (
    DependencyGate,
    check_dependencies,
    data_screen_statement,
    model_scan_statement,
    scan_models,
)
from pipeline.runner.progress import ProgressEvent, StdoutTail
from pipeline.runner.record import (
    RunRecord,
    RunResult,
    byproducts,
    determinism,
    new_run_id,
    utc_now,
)
from pipeline.runner.reuse import NO_RUN, PUBLISHES, Expected, StageReuse
from pipeline.runner.sandbox import NO_SANDBOX
from pipeline.runner.signing import (
    accept_layout,
    config_code,
    ensure_keys,
    functionary_key,
    layout_pins,
    release_key_paths,
    write_signed_layout,
)
from pipeline.scan.model import UnsafeModelError
from pipeline.workspace import (
    BASE_MODEL,
    CANDIDATE,
    CHECKS_DIR,
    DATA,
    DEPENDENCIES,
    LAYOUT_NAME,
    MODELS,
    RUN_RECORD,
    Workspace,
    base_model_name,
    spec_name,
)

__all__ = ["RunResult", "Runner", "ensure_keys", "write_signed_layout"]


# A stage still running after this long is a long one (the train stage: TensorFlow's import
# alone takes longer); preloading during a short one would delay noticing that it ended.
PRELOAD_AFTER_S = 2.0


def _preload_signing_then(watch: Callable[[], None] | None) -> Callable[[], None]:
    """A stage's watch (called while it runs) that, once the stage has run PRELOAD_AFTER_S,
    first imports what the release signature needs (openssf.preload, once per process):
    ~1 s that overlaps a long stage instead of following the last one."""
    started = time.monotonic()

    def preload_then_watch() -> None:
        if time.monotonic() - started >= PRELOAD_AFTER_S:
            openssf.preload()
        if watch is not None:
            watch()

    return preload_then_watch


class Runner:
    """Runs one pipeline config once, in a fresh run directory of the workspace.

    `runner.run()` is the whole pipeline. To drive the stages yourself (the candidate gate,
    reproduce), use `with runner.session():` — it starts the run, and whatever way the block
    ends is recorded: an exception marks run.json "failed" with its message, and lineage is
    logged once when the block ends (not after Ctrl-C).
    """

    def __init__(
        self,
        config: PipelineConfig,
        workspace: Workspace,
        *,
        on_event: Callable[[str], None] = lambda _msg: None,
        verify_environment_files: bool = True,
        candidate: bool = False,
        layout: Path | None = None,
        owner: TrustedOwner | None = None,
        sandbox: bool = True,
        reuse: bool = False,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        detach_lineage: bool = False,
    ) -> None:
        """`layout` (with the `owner` key that signed it): run under a layout the owner signed
        beforehand, with only the functionary key here. Without it, the one-machine
        convenience path: dev keys, and the layout signed on the fly for this run. `reuse`: a
        stage whose earlier link of this workspace proves the same inputs and intact products
        is not run again (runner/reuse.py).

        `detach_lineage`: MLflow logging leaves the critical path (`chainproof run`'s default);
        otherwise the session waits for it (what the candidate gate and reproduce need)."""
        if (layout is None) != (owner is None):
            raise ValueError("a pre-signed layout needs the owner key that signed it")
        self.given_layout = layout
        self.trusted_owner = owner
        self.candidate = candidate  # a candidate's deploy also requires the gate comparison
        self.config = config
        self.ws = workspace
        self.say = on_event
        self.on_progress = on_progress  # epochs a stage reports, as they happen
        self.verify_files = verify_environment_files
        self.use_sandbox = sandbox  # False only for an explicit --no-sandbox, recorded
        self.sandbox = NO_SANDBOX
        self.reuse_enabled = reuse
        self.reuse: StageReuse | None = None
        self.reused: dict[str, dict[str, str]] = {}  # stage -> the run and link it came from
        self.run_id = new_run_id()
        self.run_dir = workspace.runs / self.run_id
        self.links_dir = workspace.links(self.run_id)
        self.layout_path = self.links_dir / LAYOUT_NAME
        self.record = RunRecord(self.run_dir / RUN_RECORD)
        self._locks: dict[Path, LockFile] = {}
        self._environments: dict[str, tuple[Path, Fingerprint]] = {}  # lock sha256 -> checked
        self._digest_cache: dict[tuple[int, ...], str] = {}
        self._final: dict[str, Any] = {"status": "succeeded"}
        self.stage_seconds: dict[str, dict[str, float]] = {}
        self.done: list[str] = []
        self.model_scans: list[dict[str, Any]] = []
        self.lineage = ""
        self.detach_lineage = detach_lineage
        self.lineage_pending: detached.Pending | None = None
        self.published: Path | None = None  # set only once this process verified and published
        self.gate: DependencyGate | None = None  # set by prepare()
        self._owner: KeyPair | None = None

    # ------------------------------------------------------------------ run lifecycle

    def locks(self) -> list[Path]:
        return list(
            dict.fromkeys([self.config.lock, *(s.lock for s in self.config.stages if s.lock)])
        )

    def run(
        self,
        *,
        publish: bool = True,
        new_run: bool = False,
        bundle_check: uptodate.BundleCheck | None = None,
    ) -> RunResult:
        """Every stage, then verify the chain, then (with a deploy stage) publish the release.

        With reuse, and unless `new_run`: when the run behind the latest release would be
        reproduced stage for stage and its release still verifies, no new run is made
        (runner/uptodate.py) and the result is that run's, with `up_to_date` set.
        `bundle_check`: that release's verification, started early (BundleCheck.start)."""
        try:
            self.prepare()
            if publish and self.reuse_enabled and not new_run and not self.candidate:
                current = self._up_to_date(bundle_check)
                if current is not None:
                    return current
        finally:
            if bundle_check is not None:
                bundle_check.cancel()  # its child never outlives the question
        with self.session():
            self.run_stages(self.config.stages)
            report = self.verify_run()
            release = self.publish_release() if publish else None
            self.finish(release=str(release) if release else None)
        return RunResult(
            self.run_id,
            self.run_dir,
            self.links_dir,
            release,
            report,
            self.stage_seconds,
            self.lineage,
            self.reused,
        )

    @contextmanager
    def session(self) -> Iterator[Runner]:
        try:
            self.start()
            yield self
        except BaseException as e:
            if not self.run_dir.is_dir():  # refused before the run existed: nothing to record
                raise
            self._update(status="failed", error=getattr(e, "message", repr(e)))
            if not isinstance(e, KeyboardInterrupt):
                self.lineage = self.log_lineage()
            raise
        self._update(**self._final)
        self.lineage = self.log_lineage()

    def finish(self, **fields: Any) -> None:
        """What run.json says when the session ends without an error (default: succeeded)."""
        self._final.update(fields)

    def _up_to_date(self, bundle_check: uptodate.BundleCheck | None) -> RunResult | None:
        if self.given_layout is not None or self.gate is None:
            return None
        for stage in self.config.stages:
            if stage.lock:  # a stage's own environment drifted: refused (exit 3), as a run would
                self.environment_for(stage)  # (the bootstrap checked this interpreter's files)
        keys = release_key_paths(self.ws.keys)
        current = uptodate.latest_current(
            self.config,
            self.ws,
            code=self.code,
            owner=self.owner_key,
            functionary=self.functionary.public,
            release_key=release_public_key(keys[1].read_bytes()) if keys else None,
            dependency_statement=self.gate.statement,
            sandbox=self.sandbox if self.use_sandbox else False,  # found and probed once
            bundle_check=bundle_check,
        )
        if current is None:
            return None
        self.say(
            f"up to date: run {current.run_id} would be reproduced stage for stage, and its "
            "release verifies"
        )
        lineage = current.lineage
        mlflow_run = lineage.get("run_id") if isinstance(lineage, dict) else None
        if isinstance(mlflow_run, str) and uptodate.MLFLOW_RUN_ID.fullmatch(mlflow_run):
            said = f"run {current.run_id}'s, MLflow run {mlflow_run}"
        else:
            said = f"run {current.run_id}'s (run.json); `chainproof lineage sync` logs it"
        return RunResult(
            current.run_id,
            current.run_dir,
            self.ws.links(current.run_id),
            current.release,
            current.report,
            {},
            said,
            current.stages,
            up_to_date=True,
        )

    def start(self) -> None:
        """Keys, dependency gate, run directory, signed layout. Nothing here runs stage code.

        Everything that can refuse the run (bad lock, a dependency policy violation) happens
        before the run directory exists.
        """
        self.prepare()
        self._create()

    def prepare(self) -> None:
        """What can refuse the run before it exists: sandbox, keys, layout, locks, dependency
        gate. Once per runner."""
        if self.gate is not None:
            return
        if self.use_sandbox:
            self.sandbox = sandbox.find_bubblewrap()  # refuses (exit 2) before anything runs
            self.say(f"sandbox: bubblewrap {self.sandbox.version}")
        else:
            self.say("WARNING: --no-sandbox: stages run unisolated; run.json and every link say so")
        self.code = config_code(self.config)
        self.git = git_state(package_dir("pipeline"))
        if self.given_layout is None or self.trusted_owner is None:
            owner, self.functionary = ensure_keys(self.ws.keys)
            self.owner_key: PublicKey = owner.public
            self.layout_signed_by = "runner"
        else:
            self.functionary = functionary_key(self.ws.keys)
            self.owner_key = self.trusted_owner.key
            self.layout_signed_by = "owner"
            accept_layout(
                self.given_layout, self.owner_key, self.config, self.code, self.functionary.public
            )
        for lock in self.locks():
            self.lock_for(lock)
        gate = check_dependencies(
            self.locks(),
            self.config.security.dependencies,
            self.ws.root,
            vex_keys=[self.owner_key],  # VEX counts only when the owner signed it
        )
        for warning in gate.warnings:
            self.say(f"WARNING: {warning}")
        self.say(f"dependency gate: {gate.summary}")
        # The bootstrap's background walk of TensorFlow, MLflow, ... (envmanifest.DEFERRED)
        # answers before any stage runs or the run is found up to date: drift is exit 3 here.
        envmanifest.settle_all()
        self.gate = gate
        self._owner = owner if self.given_layout is None else None

    def _create(self) -> None:
        """The run directory, its records and the signed layout."""
        gate, owner = self.gate, self._owner
        assert gate is not None
        self.ws.runs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir()  # exclusive: concurrent runs never share a directory
        for sub in ("specs", "logs", "keys", CHECKS_DIR):
            (self.run_dir / sub).mkdir()
        self.links_dir.mkdir(parents=True)
        shutil.copyfile(self.config.path, self.run_dir / "config.yaml")
        (self.run_dir / "locks").mkdir()
        for lock in self.locks():  # the exact locks, for diff and reproduce; digests are in links
            shutil.copyfile(lock, self.run_dir / "locks" / lock.name)
        atomic_write_text(self.run_dir / "keys/owner.pub", self.owner_key.to_json())
        atomic_write_text(self.run_dir / "keys/functionary.pub", self.functionary.public.to_json())
        if self.given_layout is None:
            assert owner is not None
            write_signed_layout(
                self.config,
                owner,
                self.functionary.public,
                self.layout_path,
                self.ws.keys,
                pins=layout_pins(self.config, self.code, signed_by="runner", run_id=self.run_id),
                extra_checks=(CANDIDATE,) if self.candidate else (),
            )
        else:
            shutil.copyfile(self.given_layout, self.layout_path)
        write_signed_statement(self.run_dir / DEPENDENCIES, gate.statement, self.functionary.signer)
        if self.reuse_enabled:
            self.reuse = StageReuse(
                self.ws, run_id=self.run_id, key=self.functionary.public, code=self.code
            )
        self.record.write(
            {
                "run_id": self.run_id,
                "pipeline": self.config.name,
                "config": str(self.config.path),
                "config_sha256": self.config.sha256,
                "links": os.path.relpath(self.links_dir, self.run_dir),
                "layout": os.path.relpath(self.layout_path, self.run_dir),
                "started": utc_now(),
                "stages": [s.name for s in self.config.stages],
                "source_commit": git_commit(self.config.base_dir),
                "config_dir": str(self.config.base_dir),
                "code": {"sha256": self.code.sha256, **self.git},
                "layout_signed_by": self.layout_signed_by,
                "status": "running",
                "dependency_scan": gate.summary,
                "sandbox": self.sandbox.describe(),
            }
        )
        atomic_symlink(self.run_id, self.ws.runs / "latest")
        self.say(f"run {self.run_id}: {len(self.config.stages)} stage(s) of '{self.config.name}'")
        if self.layout_signed_by == "runner":
            self.say(
                "layout: signed on this machine for this run (one-machine convenience; for a "
                "release the owner signs beforehand: chainproof layout, then run --layout)"
            )

    def _update(self, **fields: Any) -> None:
        if self.record.path.exists():
            self.record.update(**fields)

    def log_lineage(self) -> str:
        """Log the run to MLflow; a failure is reported, recorded, and never fails the run.

        With `detach_lineage` a detached process logs it (runner/detached.py) and this returns
        at once, saying where it will appear; `self.lineage_pending` is that process.
        """
        published = self.published is not None
        spec = self.config.lineage
        if self.detach_lineage and spec.enabled:
            self.lineage_pending = detached.spawn(
                self.run_dir, self.ws.root, spec, self.config.name, published=published
            )
            root = self.ws.root
            return self.lineage_pending.describe(
                lambda p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
            )
        logged = detached.record_lineage(
            self.run_dir, spec, self.ws.root, self.config.name, published=published, say=self.say
        )
        if logged.seconds is not None:
            self.stage_seconds.setdefault("_lineage", {})["sync"] = logged.seconds
        return logged.summary

    # ------------------------------------------------------------------ environments

    def lock_for(self, path: Path) -> LockFile:
        if path not in self._locks:
            self._locks[path] = parse_lock(path)
        return self._locks[path]

    def environment_for(self, stage: StageConfig) -> tuple[Path, Fingerprint]:
        """(interpreter, fingerprint) for the stage; drift raises EnvironmentDrift.

        Each lock's environment is checked once per run (the bootstrap already checked this
        interpreter's files at start-up, and check_environment reuses that).
        """
        default = self.lock_for(self.config.lock)
        lock = self.lock_for(stage.lock) if stage.lock else default
        if lock.sha256 in self._environments:
            return self._environments[lock.sha256]
        if lock.sha256 == default.sha256:
            python = Path(sys.executable)
            fp = check_environment(lock, verify_files=self.verify_files)
        else:
            python = ensure_environment(lock, self.ws.envs, self.say)
            fp = check_environment(lock, python=python, verify_files=self.verify_files)
        self._environments[lock.sha256] = (python, fp)
        return python, fp

    # ------------------------------------------------------------------ stages

    def gates(self) -> list[StageConfig]:
        return [s for s in self.config.stages if s.impl.gate]

    def run_stages(self, stages: Iterable[StageConfig]) -> None:
        for stage in stages:
            self.run_stage(stage)

    def _hash(self, named: dict[str, Path], *, reread: bool = False) -> dict[str, dict[str, str]]:
        """Artifact digests; a file unchanged since this run hashed it is not read again.

        `reread`: read every file whatever its stat says (the check after a stage, which must
        not trust timestamps a writer could have preserved); a file that is gone is left out.
        """
        out, todo = {}, {}
        for name, path in named.items():
            try:
                st = path.stat()
            except FileNotFoundError:
                if reread:
                    continue
                raise
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key in self._digest_cache and not reread:
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
        if stage.impl.gate:
            extra["checks"] = {
                "dependencies": f"../{DEPENDENCIES}",
                "models": f"../{MODELS}",
                **({"candidate": f"../{CANDIDATE}"} if self.candidate else {}),
                **({"data": f"../{DATA}"} if self.screened else {}),
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
    def screened(self) -> bool:
        """The config has a data screen: its signed verdict is a gate check."""
        return any(s.impl.screens for s in self.config.stages)

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
            from pipeline.runner import basemodel  # urllib and the model scanner: only here

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
        external = {
            param: sandbox.resolve_external(value, self.config.base_dir, [self.ws.keys])
            for param, value in stage.impl.external_inputs(stage.params).items()
        }
        if external:
            spec["extra"]["external"] = {k: str(v) for k, v in external.items()}
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
        if stage.impl.gate:
            write_signed_statement(
                self.run_dir / MODELS,
                model_scan_statement(self.model_scans, self.config.security.models.fail_on),
                self.functionary.signer,
            )
            named.update(list_tree(self.run_dir / CHECKS_DIR, prefix=f"{CHECKS_DIR}/"))
        materials = self._hash(named)
        timings["materials"] = time.perf_counter() - t0
        if self.reuse is not None:
            reused = self._reuse_stage(stage, spec, materials, external, timings)
            if reused is not None:
                return reused

        command = stage_command(stage.impl.module, stage.name)
        self._check_code(stage, "before it ran")
        self.say(f"[{stage.name}] running {' '.join(command)}")
        t0 = time.perf_counter()
        logs = sandbox.StageLogs(
            stdout=self.run_dir / "logs" / f"{stage.name}.stdout",
            stderr=self.run_dir / "logs" / f"{stage.name}.stderr",
        )
        visible = [*named.values(), *(p for p in external.values() if p.exists())]
        if stage.impl.gate:  # it re-verifies the chain so far: the run's files and its links
            visible += [
                p
                for n, p in list_tree(self.run_dir).items()
                if n.split("/", 1)[0] not in ("logs", "tmp", stage.name)
            ]
            visible.append(self.links_dir)
        plan = distributed.plan_for(stage)  # several TensorFlow workers: started together
        workers = plan and distributed.Workers(
            plan,
            distributed.environment_check(
                self.lock_for(stage.lock or self.config.lock),
                python,
                verify_files=self.verify_files,
            ),
            self.say,
        )
        watch: Callable[[], None] | None = (
            StdoutTail(stage.name, logs.stdout, self.on_progress) if self.on_progress else None
        )
        if self.config.stages[-1].impl.publishes:
            watch = _preload_signing_then(watch)
        rc = (workers.execute if workers else sandbox.execute)(
            [str(python), *command[1:]],
            workdir=workdir,
            scratch=self.run_dir / "tmp" / stage.name,
            logs=logs,
            timeout=stage.timeout,
            sandbox=self.sandbox,
            mounts=sandbox.Mounts(
                read_only=tuple(visible),
                network=stage.network,
                forbidden=(self.ws.keys,),
                anchor=self.run_dir,
            ),
            packages=sandbox.package_dirs(("pipeline", stage.impl.module.split(".")[0])),
            watch=watch,
        )
        timings["execute"] = time.perf_counter() - t0
        self._check_code(stage, "while it ran")
        if rc != 0:
            reason = "timed out" if rc is None else f"exited with code {rc}"
            raise StageFailed(
                stage.name,
                f"{reason}; no link was written, so nothing it produced counts as attested",
                log_tail=logs.tail(),
                hint=f"read {logs.stderr} and fix the cause, then run again",
            )
        t0 = time.perf_counter()
        changed = sandbox.changed_materials(materials, self._hash(named, reread=True))
        timings["materials_recheck"] = time.perf_counter() - t0
        if changed:
            raise StageFailed(
                stage.name,
                "its materials changed while it ran; no link was written\n  "
                + "\n  ".join(changed),
                hint="something outside the stage rewrote its inputs: find what, then run again",
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
                log_tail=logs.tail(),
            )
        products = self._hash(produced)
        self.model_scans += self._scan_products(stage, workdir, logs)
        log_names = {"stdout": f"logs/{logs.stdout.name}", "stderr": f"logs/{logs.stderr.name}"}
        log_digests = self._hash(
            {log_names["stdout"]: logs.stdout, log_names["stderr"]: logs.stderr}
        )
        timings["products"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        link_byproducts = byproducts(
            rc, {w: (n, log_digests[n]) for w, n in log_names.items()}, timings["execute"]
        )
        if workers:  # every worker's environment, exit status and log digests
            link_byproducts.update(workers.byproducts(self._hash))
        environment = {
            **fingerprint.as_dict(),
            "determinism": determinism(stage),
            **({"base_model": base.origin} if base is not None else {}),
            "stage_environment": "own lock" if stage.lock else "pipeline lock",
            "sandbox": self.sandbox.record(network=stage.network),
            **self._run_binding(),
        }
        link = write_link(
            self.links_dir,
            name=stage.name,
            materials=materials,
            products=products,
            command=command,
            byproducts=link_byproducts,
            environment=environment,
            signer=self.functionary.signer,
        )
        self._sign_screen(stage)
        timings["sign"] = time.perf_counter() - t0
        self.stage_seconds[stage.name] = timings
        self.done.append(stage.name)
        self.say(
            f"[{stage.name}] ok in {timings['execute']:.1f}s; {len(products)} product(s), "
            f"link {link.name}"
        )
        return link

    def _check_code(self, stage: StageConfig, when: str) -> None:
        """The code on disk is still the code this run pinned (it is cheap: ~100 files)."""
        now = config_code(self.config)
        if now.sha256 != self.code.sha256:
            raise StageFailed(
                stage.name,
                f"chainproof's or a stage's code changed {when}; no link was written:\n    "
                + "\n    ".join(now.diff(dict(self.code.files))[:20]),
                hint="something is editing the code under a running pipeline; find it first",
            )

    def chain_links(self) -> dict[str, Link]:
        """The links written so far, by stage (unverified payloads, for the runner's own use)."""
        kid = self.functionary.public.keyid
        return {s: read_link(self.links_dir / link_filename(s, kid)) for s in self.done}

    def _scan_products(
        self, stage: StageConfig, workdir: Path, logs: sandbox.StageLogs
    ) -> list[dict[str, Any]]:
        """Model files a stage produced are scanned before any link calls them good."""
        fail_on = self.config.security.models.fail_on
        try:
            return scan_models(stage.name, workdir, self.run_dir, fail_on)
        except UnsafeModelError as e:
            raise StageFailed(
                stage.name,
                "a model file it produced failed the model scan; no link was written\n"
                + e.diagnostics(),
                log_tail=logs.tail(),
            ) from e

    # ------------------------------------------------------------------ verify and release

    def verify_run(self) -> VerifyReport:
        report = verify_chain(
            layout_path=self.layout_path,
            link_dir=self.links_dir,
            owner=self.owner_key,
            disk=DiskArtifacts(self.run_dir),
            target=str(self.run_dir),
        )
        self.say("verified: the whole chain holds")
        return report

    def sign_statement(self, path: Path, stmt: dict[str, Any]) -> None:
        """Sign a Statement about this run (a gate comparison, a reproduction) with its key."""
        write_signed_statement(path, stmt, self.functionary.signer)

    def publish_release(self) -> Path | None:
        """Publish the release bundle, when the last stage publishes (a deploy stage)."""
        if not self.config.stages[-1].impl.publishes:
            return None
        record = self.record.read()
        final = publish(
            ReleaseInputs(
                config=self.config,
                run_id=self.run_id,
                run_dir=self.run_dir,
                links_dir=self.links_dir,
                layout_path=self.layout_path,
                locks={lock: self.lock_for(lock).sha256 for lock in self.locks()},
                links=self.chain_links(),
                owner=self.owner_key,
                functionary=self.functionary,
                release_key=release_key_paths(self.ws.keys),
                started=record["started"],
                finished=utc_now(),
                source_commit=record.get("source_commit"),
                code={"sha256": self.code.sha256, **self.git},
                layout_signed_by=self.layout_signed_by,
                destination=self.ws.root
                / self.config.release_dir
                / self.config.name
                / self.release_version,
            )
        )
        self.say(f"released {final}")
        self.published = final
        return final

    # ------------------------------------------------------------------ reuse

    def _run_binding(self) -> dict[str, Any]:
        """What binds a link to this run (verify checks it): run id, config and code digests."""
        return {
            "run_id": self.run_id,
            "config_sha256": self.config.sha256,
            "code": {"sha256": self.code.sha256, **self.git, "manifest": dict(self.code.files)},
        }

    def _sign_screen(self, stage: StageConfig) -> None:
        """A screen stage's verdict, signed and bound to this run, for the gates (also when
        the stage was reused: the Statement names this run, never an earlier one)."""
        if stage.impl.screens:
            write_signed_statement(
                self.run_dir / DATA,
                data_screen_statement(self.run_id, stage.name, self.run_dir),
                self.functionary.signer,
            )

    def _reuse_stage(
        self,
        stage: StageConfig,
        spec: dict[str, Any],
        materials: dict[str, dict[str, str]],
        external: dict[str, Path],
        timings: dict[str, float],
    ) -> Path | None:
        """Sign a link for `stage` over an earlier run's re-verified products, when one proves
        the same inputs (runner/reuse.py); None when the stage must run."""
        assert self.reuse is not None
        if distributed.plan_for(stage) is not None:
            # its workers' logs are in the chain too; a distributed stage always runs
            return None
        t0 = time.perf_counter()
        workdir = self.run_dir / stage.name
        self._check_code(stage, "before it was reused")
        verdict = self.reuse.find(
            Expected(
                stage=stage,
                spec=spec,
                materials={n: d for n, d in materials.items() if n != spec_name(stage.name)},
                lock_sha256=self.lock_for(stage.lock or self.config.lock).sha256,
                sandbox=self.sandbox.record(network=stage.network),
                external=external,
            ),
            adopt_into=self.run_dir,
        )
        earlier = verdict.earlier
        if earlier is None:
            if verdict.reason is not None and verdict.reason.kind not in (NO_RUN, PUBLISHES):
                self.say(f"[{stage.name}] not reusable: {verdict.reason}")
            return None
        logs = sandbox.StageLogs(
            stdout=self.run_dir / "logs" / f"{stage.name}.stdout",
            stderr=self.run_dir / "logs" / f"{stage.name}.stderr",
        )
        self.model_scans += self._scan_products(stage, workdir, logs)
        link_byproducts, environment = self.reuse.link_fields(
            earlier,
            environment=self._run_binding(),
        )
        link = write_link(
            self.links_dir,
            name=stage.name,
            materials=materials,
            products=dict(earlier.link.products),
            command=stage_command(stage.impl.module, stage.name),
            byproducts=link_byproducts,
            environment=environment,
            signer=self.functionary.signer,
        )
        self._sign_screen(stage)
        timings["reuse"] = time.perf_counter() - t0
        self.stage_seconds[stage.name] = timings
        self.done.append(stage.name)
        self.reused[stage.name] = earlier.record(self.ws.root)
        self._update(reused=self.reused)
        self.say(
            f"[{stage.name}] reused from run {earlier.run_id} "
            f"({self.reused[stage.name]['link']}): {len(earlier.link.products)} product(s) "
            f"re-verified, link {link.name}"
        )
        return link
