"""Lineage for people: a run directory logged to MLflow. The only module that imports mlflow.

The run directory and its signed links are the source of truth; MLflow is a view of them.
`MLflowLineage.sync(run_dir)` logs one parent run per pipeline run and one nested run per
stage (params, per-epoch metrics, plots, link and logs as artifacts, digests as tags), the
dataset as an input with its real sha256, and the model as a registered version. The
`production` alias moves only for a run whose chain verified and whose release was published.
Any MLflow failure raises LineageError; the caller says so and the run stands.
"""

from __future__ import annotations

import json
import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
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
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri:
            location = (self.workspace / ARTIFACT_DIR).resolve().as_uri()
        return client.create_experiment(self.experiment, artifact_location=location)

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
                with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True):
                    lock_sha = self._stage(mlflow, run_dir, record, name, found, stages) or lock_sha
                    packaged = run_dir / name / "model.keras"
                    if (
                        found
                        and stages.get(name, {}).get("kind") == "package"
                        and packaged.is_file()
                    ):
                        version = self._register(mlflow, client, run_dir, name, record)
            alias = False
            if version is not None:
                verified = bool(
                    record.get("status") == "succeeded"
                    and record.get("release")
                    and self.verified is not None
                    and self.verified(run_dir)
                )
                client.set_model_version_tag(
                    self.registered_model,
                    version,
                    f"{TAG}verification",
                    "passed" if verified else "not verified",
                )
                if verified:
                    client.set_registered_model_alias(self.registered_model, "production", version)
                    alias = True
            mlflow.set_tags(
                {
                    f"{TAG}lock_sha256": lock_sha,
                    f"{TAG}model_version": version or "",
                    f"{TAG}alias": "production" if alias else "",
                    f"{TAG}lineage": "complete",
                }
            )
            parent_id = parent.info.run_id
        return LineageResult(self.tracking_uri, exp_id, parent_id, version, alias)

    def _stage(self, mlflow, run_dir, record, name, links, stages) -> str | None:
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
        if not links:
            tags[f"{TAG}link"] = "missing: the stage did not complete"
            mlflow.set_tags(tags)
            return None
        link_file = links[0]
        link = read_link(link_file)
        lock_sha = link.environment.get("lock_sha256", "")
        tags.update(
            {
                f"{TAG}link_sha256": sha256_file(link_file),
                f"{TAG}lock_sha256": lock_sha,
                f"{TAG}functionary_keyid": link_file.name.split(".")[-2],
            }
        )
        mlflow.set_tags(tags)
        mlflow.log_artifact(str(link_file), "attestation")
        stage_dir = run_dir / name
        for png in sorted(stage_dir.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")
        metrics_file = stage_dir / "metrics.json"
        if kind == "train" and metrics_file.is_file():
            self._train_metrics(mlflow, bounded.read_json(metrics_file, what="metrics"))
            self._dataset_input(mlflow, run_dir, link)
        return lock_sha

    @staticmethod
    def _train_metrics(mlflow, metrics: dict[str, Any]) -> None:
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

    @staticmethod
    def _dataset_input(mlflow, run_dir: Path, link) -> None:
        from mlflow.data.meta_dataset import MetaDataset

        # mlflow.data.sources builds these names at import time, so mypy cannot see them
        from mlflow.data.sources import (  # type: ignore[attr-defined]
            HTTPDatasetSource,
            LocalArtifactDatasetSource,
        )

        materials = {k: v["sha256"] for k, v in link.materials.items()}
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
            # input tag chainproof.sha256.
            dataset = MetaDataset(  # type: ignore[abstract]  # MLflow's own concrete class
                source=source, name=manifest.get("name", name), digest=f"sha256:{digest[:29]}"
            )
            mlflow.log_input(
                dataset,
                context="training",
                tags={
                    f"{TAG}sha256": digest,
                    f"{TAG}origin": location,
                    f"{TAG}origin_sha256": str(origin.get("sha256", "")),
                    **({f"{TAG}files": str(origin["files"])} if "files" in origin else {}),
                },
            )

    def _register(self, mlflow, client, run_dir: Path, stage: str, record) -> str:
        model = run_dir / stage / "model.keras"
        mlflow.log_artifact(str(model), "model")
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(self.registered_model)
        except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the first version of this model
            client.create_registered_model(self.registered_model)
        run = mlflow.active_run()
        mv = client.create_model_version(
            self.registered_model,
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={
                f"{TAG}weights_sha256": sha256_file(model),
                f"{TAG}run_id": record["run_id"],
                f"{TAG}verification": "pending",
            },
        )
        return str(mv.version)


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
