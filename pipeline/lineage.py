"""Lineage for people: a run directory logged to MLflow. The only module that imports mlflow.

The run directory and its signed links are the source of truth; MLflow is a view of them.
`MLflowLineage.sync(run_dir)` logs one parent run per pipeline run and one nested run per
stage (params, per-epoch metrics, plots, link and logs as artifacts, digests as tags), the
dataset as an input with its real sha256, and the model as a registered version: for a
published release, an MLflow Model (a pyfunc from code, release/pyfunc_model.py) whose artifact
is the verified bundle, one version per distinct weights digest. Every run and version carries
the lineage as markdown with full digests (data -> links -> weights -> release). The
`production` alias moves only for a run whose chain verified and whose release was published.
Any MLflow failure raises LineageError; the caller says so and the run stands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline import bounded
from pipeline.config import LineageSpec
from pipeline.errors import Error, InputError
from pipeline.hashing import sha256_file
from pipeline.workspace import DATA_MANIFEST, read_run_record

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
ARTIFACT_DIR = "mlartifacts"
TAG = "chainproof."
# MLflow's UI decides between its GenAI (traces) and classic ML layout by this experiment tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE = "mlflow.note.content"  # what the UI renders as a run's markdown description
MODEL_NAME = "model"  # the MLflow Model's name within its run
RUNS_TAG_CHARS = 4000  # model version tag values are capped (5000); keep the newest runs
EXAMPLE_ROWS = 5
EXAMPLE_BYTES = 1 << 20  # an input example is a handful of rows, read without the whole array
# MLflow executes this file to load a release's model (models-from-code); chainproof never
# imports it
PYFUNC_MODEL = Path(__file__).resolve().parent / "release" / "pyfunc_model.py"


class LineageError(Error):
    """MLflow could not be reached or refused the lineage; the run itself is unaffected."""

    exit_code = 6


@dataclass(frozen=True)
class LineageResult:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    model_version: str | None
    alias_set: bool
    already_logged: bool = False


class LineageSink(ABC):
    @abstractmethod
    def sync(self, run_dir: Path) -> LineageResult | None:
        """Log the run directory's lineage; idempotent per chainproof run id."""


class NullLineage(LineageSink):
    def sync(self, run_dir: Path) -> None:
        return None


def resolve_tracking_uri(uri: str, workspace: Path) -> str:
    """A relative sqlite path is relative to the workspace, like every generated file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((workspace / uri[len(prefix) :]).resolve())
    return uri


def git_commit(directory: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if not isinstance(value, str) else value


# Answers "did this run's chain and its release verify?" from a real verification (never from
# run.json, which is unsigned). Only a True answer tags a model version verified and moves
# the production alias.
Verifier = Callable[[Path], bool]


class MLflowLineage(LineageSink):
    def __init__(
        self,
        tracking_uri: str,
        *,
        workspace: Path,
        experiment: str,
        registered_model: str,
        verified: Verifier | None = None,
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri, workspace)
        self.workspace = workspace
        self.verified = verified
        self.experiment = experiment
        self.registered_model = registered_model

    def sync(self, run_dir: Path) -> LineageResult:
        try:
            return self._sync(run_dir.resolve())
        except Error:
            raise
        except Exception as e:  # MLflow raises many types (HTTP, SQL, REST); all mean "not logged"
            raise LineageError(
                f"lineage was NOT logged to {self.tracking_uri}: {type(e).__name__}: {e}",
                hint=f"the run is intact; when MLflow is back: chainproof lineage sync {run_dir}",
            ) from e

    # ------------------------------------------------------------------ internals

    def _client(self):
        # Fail fast when the server is down (MLflow's default retries take minutes); the
        # run is safe on disk and `chainproof lineage sync` logs it later.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow, MlflowClient(self.tracking_uri)

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if EXPERIMENT_KIND[0] not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri:
            location = (self.workspace / ARTIFACT_DIR).resolve().as_uri()
        return client.create_experiment(
            self.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )

    def _sync(self, run_dir: Path) -> LineageResult:
        record = read_run_record(run_dir)
        rid = record["run_id"]
        mlflow, client = self._client()
        exp_id = self._experiment_id(client)
        existing = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TAG}run_id` = '{rid}' and tags.`{TAG}level` = 'pipeline'",
        )
        done = [r for r in existing if r.data.tags.get(f"{TAG}lineage") == "complete"]
        if done:
            r = done[0]
            return LineageResult(
                self.tracking_uri,
                exp_id,
                r.info.run_id,
                r.data.tags.get(f"{TAG}model_version"),
                r.data.tags.get(f"{TAG}alias") == "production",
                already_logged=True,
            )
        links_dir = (run_dir / record["links"]).resolve()
        config = recorded_config(run_dir)
        stages = {
            s["name"]: s
            for s in config.get("stages") or []
            if isinstance(s, dict) and isinstance(s.get("name"), str)
        }
        released = self._released(run_dir, record)
        trail = Trail(run_id=rid, release=released)
        lock_sha = ""
        version = None
        with mlflow.start_run(experiment_id=exp_id, run_name=rid) as parent:
            mlflow.set_tags(
                {
                    f"{TAG}run_id": rid,
                    f"{TAG}level": "pipeline",
                    f"{TAG}pipeline": record["pipeline"],
                    f"{TAG}status": record.get("status", "unknown"),
                    f"{TAG}config_sha256": record.get("config_sha256", "unknown"),
                    "mlflow.source.git.commit": record.get("source_commit", "unknown"),
                }
            )
            params: dict[str, str] = {}
            _flatten("", {k: v for k, v in config.items() if k != "stages"}, params)
            for name, st in stages.items():
                _flatten(f"{name}", st.get("params", {}), params)
            mlflow.log_params({k[:250]: v[:6000] for k, v in params.items()})
            mlflow.log_artifact(str(run_dir / "config.yaml"))
            mlflow.log_artifact(str(run_dir / "run.json"))
            for name in record["stages"]:
                found = sorted(links_dir.glob(f"{name}.*.link"))
                with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True) as child:
                    trail.stage_runs[name] = child.info.run_id
                    lock_sha = (
                        self._stage(mlflow, run_dir, record, name, found, stages, trail) or lock_sha
                    )
                    packaged = run_dir / name / "model.keras"
                    if (
                        found
                        and stages.get(name, {}).get("kind") == "package"
                        and packaged.is_file()
                    ):
                        version = self._register(mlflow, client, run_dir, name, trail)
            alias = False
            verification = ""
            if version is not None:
                verification = self._verification(run_dir, record, released)
                if verification == "passed" or not trail.reused:
                    # a reused version is never downgraded by a later run that did not verify
                    client.set_model_version_tag(
                        self.registered_model, version, f"{TAG}verification", verification
                    )
                if released is not None:
                    client.set_registered_model_alias(self.registered_model, "production", version)
                    alias = True
            self._parent_view(mlflow, client, parent.info.run_id, trail, version, alias)
            mlflow.set_tags(
                {
                    f"{TAG}lock_sha256": lock_sha,
                    f"{TAG}model_version": version or "",
                    f"{TAG}alias": "production" if alias else "",
                    f"{TAG}lineage": "complete",
                }
            )
            parent_id = parent.info.run_id
        self._notes(client, parent_id, trail, version, alias, verification)
        return LineageResult(self.tracking_uri, exp_id, parent_id, version, alias)

    def _released(self, run_dir: Path, record: dict[str, Any]) -> Path | None:
        """The run's release bundle, when the run succeeded and its chain and release verified."""
        release = record.get("release")
        if not (record.get("status") == "succeeded" and isinstance(release, str) and release):
            return None
        if self.verified is None or not self.verified(run_dir):
            return None
        return Path(release)

    def _verification(self, run_dir: Path, record: dict[str, Any], released: Path | None) -> str:
        """The version's verification tag: passed for a verified release; for a run without
        a release (a reproduce run), passed when its own chain verifies under this workspace's
        owner key."""
        if released is not None:
            return "passed"
        if record.get("release") or record.get("status") != "succeeded":
            return "not verified"
        from pipeline.release.verify import verify_run

        try:
            verify_run(run_dir, workspace=self.workspace)
        except Error:
            return "not verified"
        return "passed"

    def _stage(self, mlflow, run_dir, record, name, links, stages, trail: Trail) -> str | None:
        from pipeline.provenance.links import read_link

        kind = stages.get(name, {}).get("kind", "")
        tags = {
            f"{TAG}run_id": record["run_id"],
            f"{TAG}level": "stage",
            f"{TAG}stage": name,
            f"{TAG}kind": kind,
            "mlflow.source.git.commit": record.get("source_commit", "unknown"),
        }
        params: dict[str, str] = {}
        _flatten("", stages.get(name, {}).get("params", {}), params)
        if params:
            mlflow.log_params({k[:250]: v[:6000] for k, v in params.items()})
        for log in sorted((run_dir / "logs").glob(f"{name}.std*")):
            mlflow.log_artifact(str(log), "logs")
            _log_copy(mlflow, log, f"{log.name}.txt", "logs")  # the UI previews .txt, not .stdout
        if not links:
            tags[f"{TAG}link"] = "missing: the stage did not complete"
            mlflow.set_tags(tags)
            return None
        link_file = links[0]
        link = read_link(link_file)
        lock_sha = link.environment.get("lock_sha256", "")
        link_sha = sha256_file(link_file)
        trail.links.append((name, link_file.name, link_sha))
        tags.update(
            {
                f"{TAG}link_sha256": link_sha,
                f"{TAG}lock_sha256": lock_sha,
                f"{TAG}functionary_keyid": link_file.name.split(".")[-2],
                "link.sha256": link_sha,
            }
        )
        weights = run_dir / name / "model.keras"
        if "model.keras" in {Path(p).name for p in link.products} and weights.is_file():
            tags["weights.sha256"] = sha256_file(weights)
        mlflow.set_tags(tags)
        mlflow.log_artifact(str(link_file), "attestation")
        # the signed link is a DSSE JSON envelope; the UI previews it under a .json name
        _log_copy(mlflow, link_file, f"{link_file.name}.json", "attestation")
        stage_dir = run_dir / name
        for png in sorted(stage_dir.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")
        metrics_file = stage_dir / "metrics.json"
        if kind == "train" and metrics_file.is_file():
            metrics = bounded.read_json(metrics_file, what="metrics")
            trail.metrics = self._train_metrics(mlflow, metrics)
            trail.classes = len(metrics.get("test", {}).get("per_class", {}) or {})
            trail.dataset = self._dataset_input(mlflow, run_dir, link)
            if trail.dataset is not None:
                mlflow.set_tag("data.sha256", trail.dataset.sha256)
        if isinstance(link.byproducts.get("workers"), list):
            self._workers(mlflow, run_dir, name, link.byproducts["workers"])
        screen_file = stage_dir / "data_screen.json"  # stages/screen.py's report
        if kind == "screen" and screen_file.is_file():
            self._screen_findings(mlflow, bounded.read_json(screen_file, what="data screen"))
            mlflow.log_artifact(str(screen_file), "data_screen")
        return lock_sha

    @staticmethod
    def _workers(mlflow, run_dir: Path, name: str, records: list[Any]) -> None:
        """Each worker's logs, and its system metrics as MLflow logs its own with a node id
        (`system/worker-<i>/<metric>`, the UI's System Metrics tab); a file whose digest is
        not the one the link signed is left out."""
        from mlflow.entities import Metric

        from pipeline.runner import sysmetrics

        for log in sorted((run_dir / "logs").glob(f"{name}.worker-*.std*")):
            mlflow.log_artifact(str(log), "logs")
        batch: list[Any] = []
        seen: set[Path] = set()
        for r in records[: sysmetrics.MAX_WORKERS]:
            entry = r.get(sysmetrics.RECORD_KEY) if isinstance(r, dict) else None
            index = r.get("index") if isinstance(r, dict) else None
            if not isinstance(entry, dict) or not isinstance(index, int):
                continue
            path = run_dir / str(entry.get("path", ""))
            if path in seen or path.parent != run_dir / "logs" or not path.is_file():
                continue  # each file once, however many records name it
            seen.add(path)
            if sha256_file(path) != entry.get("sha256"):
                continue
            node = sysmetrics.node_id(index)
            try:
                samples = sysmetrics.read_samples(path)
            except (Error, ValueError, OverflowError):  # the run's other lineage still lands
                continue
            for step, stamp, values in samples:
                batch += [Metric(f"system/{node}/{k}", v, stamp, step) for k, v in values.items()]
            if len(batch) >= sysmetrics.MAX_LOGGED:  # a bound on one run's system metrics
                batch = batch[: sysmetrics.MAX_LOGGED]
                break
        run_id = mlflow.active_run().info.run_id
        client = mlflow.tracking.MlflowClient()
        for at in range(0, len(batch), 1000):  # MLflow's per-batch limit
            client.log_batch(run_id, metrics=batch[at : at + 1000])

    @staticmethod
    def _screen_findings(mlflow, report: Any) -> None:
        """The data screen's counts as metrics and its verdict as a tag (rows: the artifact)."""
        summary = report.get("summary") if isinstance(report, dict) else None
        if not isinstance(summary, dict):
            return
        counts = summary.get("by_kind")
        counts = counts if isinstance(counts, dict) else {}
        metrics = {
            f"screen_{str(k).replace('-', '_')}": float(v)
            for k, v in counts.items()
            if isinstance(v, int | float)
        }
        if isinstance(summary.get("flagged_rows"), int | float):
            metrics["screen_flagged_rows"] = float(summary["flagged_rows"])
        mlflow.log_metrics(metrics)
        mlflow.set_tag(f"{TAG}data_screen", str(summary.get("verdict", "unknown"))[:100])

    @staticmethod
    def _train_metrics(mlflow, metrics: dict[str, Any]) -> dict[str, float]:
        for key, values in metrics.get("history", {}).items():
            for step, value in enumerate(values):
                mlflow.log_metric(key, value, step=step)
        test = metrics.get("test", {})
        flat = {f"test_{k}": v for k, v in test.items() if isinstance(v, int | float)}
        for cls, pc in test.get("per_class", {}).items():
            flat[f"test_precision_class_{cls}"] = pc["precision"]
            flat[f"test_recall_class_{cls}"] = pc["recall"]
        mlflow.log_metrics(flat)
        mlflow.log_dict(metrics, "metrics.json")
        return flat

    @staticmethod
    def _dataset_input(mlflow, run_dir: Path, link) -> Dataset | None:
        from mlflow.data.meta_dataset import MetaDataset

        # mlflow.data.sources builds these names at import time, so mypy cannot see them
        from mlflow.data.sources import (  # type: ignore[attr-defined]
            HTTPDatasetSource,
            LocalArtifactDatasetSource,
        )

        materials = {k: v["sha256"] for k, v in link.materials.items()}
        found = None
        for name, digest in materials.items():
            # the split file, or an image source's canonical manifest (its digest is the pin)
            if not name.endswith(("dataset.npz", DATA_MANIFEST)):
                continue
            manifest_path = run_dir / name.rsplit("/", 1)[0] / "manifest.json"
            manifest = (
                bounded.read_json(manifest_path, what="dataset manifest")
                if manifest_path.is_file()
                else {}
            )
            origin = manifest.get("source", {})
            location = str(origin.get("location", run_dir / name))
            source = (
                HTTPDatasetSource(location)
                if location.startswith(("http://", "https://"))
                else LocalArtifactDatasetSource(str(run_dir / name))
            )
            # MLflow's own digest is an 8-hex MD5 of a few rows; ours is the sha256 of the
            # exact file the signed link names. MLflow caps the digest field at 36 characters,
            # so it holds a self-describing prefix "sha256:<29 hex>"; the full digest is the
            # input tag chainproof.sha256 (and the run tag data.sha256, which the UI shows).
            dataset = MetaDataset(  # type: ignore[abstract]  # MLflow's own concrete class
                source=source, name=manifest.get("name", name), digest=f"sha256:{digest[:29]}"
            )
            tags = {
                f"{TAG}sha256": digest,
                f"{TAG}origin": location,
                f"{TAG}origin_sha256": str(origin.get("sha256", "")),
                **({f"{TAG}files": str(origin["files"])} if "files" in origin else {}),
            }
            mlflow.log_input(dataset, context="training", tags=tags)
            found = Dataset(name, digest, run_dir / name, dataset, tags)
        return found

    def _parent_view(self, mlflow, client, parent_id: str, trail: Trail, version, alias) -> None:
        """What a person opening the pipeline run wants first: held-out metrics, the dataset,
        the model version (and its MLflow Model as the run's output)."""
        if trail.metrics:
            mlflow.log_metrics(trail.metrics)
        tags: dict[str, str] = {}
        if trail.dataset is not None:
            mlflow.log_input(trail.dataset.mlflow, context="training", tags=trail.dataset.tags)
            tags["data.sha256"] = trail.dataset.sha256
        if trail.weights:
            tags["weights.sha256"] = trail.weights
        if version is not None:
            tags["model.version"] = f"{self.registered_model} v{version}"
            tags["model.uri"] = f"models:/{self.registered_model}/{version}"
            if alias:
                tags["model.alias"] = "production"
        if trail.release is not None:
            tags["release"] = f"{trail.release.parent.name}/{trail.release.name}"
            for rel, dest in (
                ("artifacts/package/model_card.md", "release"),
                ("artifacts/package/model_card.json", "release"),
                ("attestations/provenance.intoto.json", "release"),
                ("attestations/release.intoto.json", "release"),
            ):
                if (trail.release / rel).is_file():
                    mlflow.log_artifact(str(trail.release / rel), dest)
        if trail.model_id:
            from mlflow.entities import LoggedModelOutput

            client.log_outputs(parent_id, [LoggedModelOutput(trail.model_id, 0)])
        mlflow.set_tags(tags)

    def _notes(self, client, parent_id: str, trail: Trail, version, alias, verification) -> None:
        """The lineage as markdown with full digests on every run and on the model version."""
        text = lineage_markdown(
            trail,
            model=self.registered_model,
            version=version,
            alias=alias,
            verification=verification,
        )
        for run_id in (parent_id, *trail.stage_runs.values()):
            client.set_tag(run_id, NOTE, text)
        if version is not None and not trail.reused:
            client.update_model_version(self.registered_model, version, description=text)

    def _version_for(self, client, weights: str, *, need_model: bool):
        """The version already registered for these weights (an MLflow Model when one is
        needed), or None."""
        found = client.search_model_versions(
            f"name = '{self.registered_model}' and tags.`{TAG}weights_sha256` = '{weights}'",
            order_by=["version_number ASC"],
        )
        own = self._own_versions()
        for mv in found:
            # Tags are whatever the store says: only a version this workspace's own runs
            # recorded registering stands for these weights (a pre-registered look-alike with
            # the predictable digest would otherwise be blessed and given the alias).
            if str(mv.version) not in own:
                continue
            if not need_model or mv.tags.get(f"{TAG}mlflow_model") == "true":
                return mv
        return None

    def _own_versions(self) -> set[str]:
        """Model versions this workspace's runs recorded in their run.json after logging."""
        own: set[str] = set()
        runs = self.workspace / "runs"
        try:
            entries = sorted(os.scandir(runs), key=lambda e: e.name, reverse=True)[:1000]
        except OSError:
            return own
        for entry in entries:
            if entry.is_symlink() or not entry.is_dir():
                continue
            try:
                lineage = read_run_record(Path(entry.path)).get("lineage")
            except Error:
                continue
            if isinstance(lineage, dict) and lineage.get("logged") is True:
                version = lineage.get("model_version")
                if isinstance(version, str | int) and not isinstance(version, bool):
                    own.add(str(version))
        return own

    def _register(self, mlflow, client, run_dir: Path, stage: str, trail: Trail) -> str:
        model = run_dir / stage / "model.keras"
        weights = sha256_file(model)
        trail.weights = weights
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(self.registered_model)
        except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the first version of this model
            client.create_registered_model(
                self.registered_model,
                description=f"Released by chainproof pipeline `{self.registered_model}`: each "
                "version is one distinct weights sha256; its description is the lineage.",
            )
        run = mlflow.active_run()
        existing = self._version_for(client, weights, need_model=trail.release is not None)
        if existing is not None:  # same weights: the version stands, this run is added to it
            trail.reused = True
            runs = [r for r in existing.tags.get(f"{TAG}runs", "").split() if r != trail.run_id]
            value = " ".join([*runs, trail.run_id])[-RUNS_TAG_CHARS:].lstrip()
            client.set_model_version_tag(
                self.registered_model, existing.version, f"{TAG}runs", value
            )
            mlflow.set_tag(f"{TAG}reused_model_version", str(existing.version))
            return str(existing.version)
        model_id = None
        if trail.release is not None:
            # MLflow checks the input example by loading the model: TensorFlow's C++ start-up
            # (cuInit, absl) writes to fd 2 directly, past Python's logging
            with native_stderr_to(self.workspace / ".chainproof" / "logs" / "third-party.log"):
                info = self._log_release_model(mlflow, run_dir, trail)
            model_id = info.model_id
            source = f"models:/{model_id}"
        else:  # no verified release (a reproduce run): the weights file alone, not loadable
            mlflow.log_artifact(str(model), "model")
            source = f"{run.info.artifact_uri}/model"
        tags = {
            f"{TAG}weights_sha256": weights,
            f"{TAG}run_id": trail.run_id,
            f"{TAG}runs": trail.run_id,
            f"{TAG}verification": "pending",
            f"{TAG}mlflow_model": "true" if model_id else "false",
            "weights.sha256": weights,
        }
        if trail.dataset is not None:
            tags["data.sha256"] = trail.dataset.sha256
        if trail.release is not None:
            tags["release"] = f"{trail.release.parent.name}/{trail.release.name}"
        mv = client.create_model_version(
            self.registered_model,
            source=source,
            run_id=run.info.run_id,
            tags=tags,
            model_id=model_id,
        )
        trail.model_id = model_id
        return str(mv.version)

    def _log_release_model(self, mlflow, run_dir: Path, trail: Trail):
        """The verified bundle as an MLflow Model: pyfunc from code, so nothing is pickled."""
        assert trail.release is not None
        from pipeline.provenance.keys import load_public_key

        owner_file = self.workspace / "attestations" / "keys" / "owner.pub"
        if not owner_file.is_file():  # the key the runner trusted (a pre-signed layout's owner)
            owner_file = run_dir / "keys" / "owner.pub"
        owner = load_public_key(owner_file).keyid
        card = bounded.read_json(
            trail.release / "artifacts" / "package" / "model_card.json", what="model card"
        )
        example = None
        if trail.dataset is not None:
            example = example_rows(trail.dataset.path, "x_test")
        # Model.log with validate_serving_input=False, as pyfunc.log_model cannot say: MLflow's
        # check loads the model to predict the example (TensorFlow into this process: seconds
        # of CPU for every release, and its C++ noise), and load_verified is tested on its own.
        return mlflow.models.Model.log(
            artifact_path=None,  # deprecated for `name`, yet a required positional
            flavor=_PyfuncFlavor,
            flavor_name="pyfunc.ModelFromCode",  # what pyfunc.log_model records for it
            validate_serving_input=False,
            name=MODEL_NAME,
            python_model=str(PYFUNC_MODEL),
            artifacts={"bundle": str(trail.release)},
            model_config={"owner_key": owner},
            signature=model_signature(card, trail.classes),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"chainproof": {"run_id": trail.run_id, "weights_sha256": trail.weights}},
        )


class _PyfuncFlavor:
    """`mlflow.pyfunc` as Model.log's flavor, minus the one kwarg only Model.log reads
    (it forwards every kwarg to the flavor's save_model, and pyfunc's refuses unknown ones)."""

    @staticmethod
    def save_model(*, validate_serving_input: bool = True, **kwargs: Any) -> Any:
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


@contextmanager
def native_stderr_to(log: Path) -> Iterator[None]:
    """File descriptor 2 appended to `log` for the block, then restored."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@dataclass(frozen=True)
class Dataset:
    """The dataset a train run read: its name in the run, full sha256, file, MLflow view."""

    name: str
    sha256: str
    path: Path
    mlflow: Any
    tags: dict[str, str]


@dataclass
class Trail:
    """What one sync learns on its way through the stages, for the views written at the end."""

    run_id: str
    release: Path | None
    stage_runs: dict[str, str] = field(default_factory=dict)
    links: list[tuple[str, str, str]] = field(default_factory=list)  # stage, file, sha256
    dataset: Dataset | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    classes: int = 0
    weights: str = ""
    model_id: str | None = None
    reused: bool = False


def lineage_markdown(
    trail: Trail, *, model: str, version: str | None, alias: bool, verification: str
) -> str:
    """data sha256 -> each signed link -> weights sha256 -> release, every digest in full."""
    lines = [
        "**Lineage** (full sha256 digests; each step is a signed in-toto link)",
        "",
    ]
    if trail.dataset is not None:
        lines.append(f"- data `{trail.dataset.name}`: `{trail.dataset.sha256}`")
    for stage, name, sha in trail.links:
        lines.append(f"- → {stage} link `{name}`: `{sha}`")
    if trail.weights:
        lines.append(f"- → weights `model.keras`: `{trail.weights}`")
    if trail.release is not None:
        lines.append(
            f"- → release `{trail.release.parent.name}/{trail.release.name}` "
            "(bundle: the MLflow Model's artifact `bundle/`; provenance and model card under "
            "`release/` of the pipeline run)"
        )
    lines.append("")
    if version is not None:
        where = f"model **{model}** version **{version}**"
        aliases = ", alias **production**" if alias else ""
        lines.append(f"{where}{aliases}; verification: **{verification or 'not verified'}**")
    lines.append(f"chainproof run `{trail.run_id}`")
    return "\n".join(lines) + "\n"


def example_rows(npz: Path, key: str, rows: int = EXAMPLE_ROWS) -> Any | None:
    """The first rows of one array of an .npz, read from its header without loading it whole.

    An input example is optional: a file that is not a plain numeric .npz gives None."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(npz) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            if fortran or dtype.hasobject or dtype.kind not in "fiub" or not shape:
                return None
            n = min(rows, shape[0])
            row_items = 1
            for d in shape[1:]:
                row_items *= d
            size = n * row_items * dtype.itemsize
            if n == 0 or size > EXAMPLE_BYTES:
                return None
            data = f.read(size)
            if len(data) != size:
                return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:])).astype(np.float32)


def model_signature(card: Any, classes: int) -> Any | None:
    """The pyfunc's tensor signature from the model card (the shape and dtype the train stage
    measured on the data) and the number of classes it was evaluated on; None when the card
    records no usable input (never an error: lineage must not fail a finished run)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    spec = card.get("input", {}) if isinstance(card, dict) else {}
    shape = spec.get("shape") if isinstance(spec, dict) else None
    dtype = spec.get("dtype", "float32") if isinstance(spec, dict) else "float32"
    if not (
        isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)
    ) or dtype not in ("float32", "float64"):
        return None  # an older card: MLflow infers the signature from the input example
    inputs = Schema([TensorSpec(np.dtype(dtype), (-1, *shape))])
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, classes))]) if classes > 0 else None
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    """What the pyfunc needs installed, pinned as installed here (serve with
    --env-manager local inside the locked environment: chainproof is not on PyPI)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("chainproof", "mlflow", "tensorflow", "numpy"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def _log_copy(mlflow, src: Path, name: str, artifact_path: str) -> None:
    """Log `src` again under `name` (a suffix the MLflow UI previews)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chainproof-lineage-") as tmp:
        dest = Path(tmp) / name
        dest.write_bytes(src.read_bytes())
        mlflow.log_artifact(str(dest), artifact_path)


def sink_for(
    lineage: LineageSpec, workspace: Path, pipeline: str, *, verified: Verifier | None = None
) -> LineageSink:
    if not lineage.enabled:
        return NullLineage()
    return MLflowLineage(
        lineage.tracking_uri or DEFAULT_TRACKING_URI,
        workspace=workspace,
        experiment=lineage.experiment or pipeline,
        registered_model=lineage.registered_model or pipeline,
        verified=verified,
    )


def recorded_config(run_dir: Path) -> dict[str, Any]:
    """The run's copy of its config, read within pipeline.bounded's caps (it is unsigned)."""
    path = run_dir / "config.yaml"
    try:
        config = bounded.read_yaml(path, what="the run's config copy")
    except FileNotFoundError:
        raise InputError(f"{run_dir} has no config.yaml", hint="is it a chainproof run?") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a mapping; it is not the config this run recorded")
    return config


def sync_run_dir(run_dir: Path, *, verified: Verifier | None = None) -> str:
    """`chainproof lineage sync RUN`: log a run afterwards, from its directory alone.

    `verified` decides whether its model version is tagged verified and made production."""
    from pipeline.workspace import workspace_of_run

    run_dir = run_dir.resolve()
    if read_run_record(run_dir).get("status") == "running":
        raise InputError(
            f"{run_dir} is still running (or was killed without a trace)",
            hint="sync it once it has finished",
        )
    config = recorded_config(run_dir)
    if not isinstance(config.get("name"), str):
        raise InputError(f"{run_dir / 'config.yaml'}: name: missing or not text")
    try:
        spec = LineageSpec.model_validate(config.get("lineage") or {})
    except ValidationError as e:
        raise InputError(f"{run_dir / 'config.yaml'}: lineage: {e}") from e
    sink = sink_for(spec, workspace_of_run(run_dir).root, config["name"], verified=verified)
    result = sink.sync(run_dir)
    if result is None:
        return "lineage is disabled in this run's config"
    state = "already logged" if result.already_logged else "logged"
    version = f"; model version {result.model_version}" if result.model_version else ""
    alias = " (alias production)" if result.alias_set else ""
    return f"{state}: {result.tracking_uri}, MLflow run {result.parent_run_id}{version}{alias}"
