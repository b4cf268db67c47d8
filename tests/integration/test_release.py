"""Release bundles from the consumer's side: offline verification, verified loading, serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.errors import VerificationError
from pipeline.release.verify import verify_target
from tests.conftest import CHAINPROOF, MAIN_LOCK, ROOT, chainproof, free_port

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def bundle_of(ws: Path) -> Path:
    (found,) = [p for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()]
    return found


def owner_fp(ws: Path) -> str:
    return json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]


@pytest.fixture
def lone_bundle(completed_workspace, tmp_path) -> tuple[Path, str]:
    """The release bundle alone, copied away from the workspace that built it."""
    dest = tmp_path / "downloaded" / "release"
    shutil.copytree(bundle_of(completed_workspace), dest)
    return dest, owner_fp(completed_workspace)


def fails(bundle: Path, fp: str) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_target(bundle, owner_key=fp)
    return info.value


def test_bundle_verifies_offline_with_only_the_owner_fingerprint(lone_bundle):
    bundle, fp = lone_bundle
    proc = chainproof("verify", bundle, "--owner-key", fp, cwd=bundle.parent)
    assert proc.returncode == 0, proc.stderr
    for shown in ("provenance/v1", "vulns/v0.2", "model-scan/v1", "SLSA v1", "locks"):
        assert shown in proc.stdout
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    for expected in (
        "artifacts/package/model.keras",
        "artifacts/package/saved_model/saved_model.pb",
        "artifacts/package/model_card.json",
        "artifacts/package/model_card.md",
        "artifacts/package/bom.cdx.json",
        "attestations/provenance.intoto.json",
        "attestations/root.layout",
        "keys/owner.pub",
        "VERIFY.md",
    ):
        assert expected in files
    assert fp in (bundle / "VERIFY.md").read_text()


def test_model_card_edit_fails(lone_bundle):
    bundle, fp = lone_bundle
    card = bundle / "artifacts/package/model_card.json"
    card.write_text(card.read_text().replace("Demonstration", "Medical diagnosis"))
    err = fails(bundle, fp)
    assert err.check == "artifacts on disk" and err.artifact.endswith("model_card.json")


def test_provenance_edit_fails(lone_bundle):
    bundle, fp = lone_bundle
    path = bundle / "attestations/provenance.intoto.json"
    env = json.loads(path.read_text())
    import base64

    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["subject"][0]["digest"]["sha256"] = "0" * 64
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    path.write_text(json.dumps(env))
    err = fails(bundle, fp)
    assert err.check == "attestations" and "provenance.intoto.json" in err.artifact


def test_missing_link_in_the_bundle_fails(lone_bundle):
    bundle, fp = lone_bundle
    next((bundle / "attestations").glob("train.*.link")).unlink()
    err = fails(bundle, fp)
    assert (err.check, err.step) == ("links present", "train")


def test_bundle_key_is_not_trusted_on_its_own(lone_bundle):
    bundle, fp = lone_bundle
    from securesystemslib.signer import CryptoSigner

    from pipeline.provenance.keys import PublicKey

    (bundle / "keys/owner.pub").write_text(
        PublicKey(CryptoSigner.generate_ed25519().public_key).to_json()
    )
    err = fails(bundle, fp)
    assert err.check == "owner key"


def test_ml_bom_is_valid_cyclonedx_1_6_with_model_data_and_every_locked_distribution(lone_bundle):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    from pipeline.envcheck import parse_lock

    bundle, _ = lone_bundle
    text = (bundle / "artifacts/package/bom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    by_type: dict[str, list] = {}
    for c in bom["components"]:
        by_type.setdefault(c["type"], []).append(c)
    # The model is what the BOM describes: metadata.component, not one of the components.
    assert "machine-learning-model" not in by_type
    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model"
    assert (
        model["hashes"][0]["content"]
        == __import__("hashlib")
        .sha256((bundle / "artifacts/package/model.keras").read_bytes())
        .hexdigest()
    )
    assert model["modelCard"]["quantitativeAnalysis"]["performanceMetrics"][0]["type"] == "accuracy"
    assert len(by_type["data"]) == 1
    pins = parse_lock(MAIN_LOCK).pins
    libs = {c["name"]: c for c in by_type["library"]}
    assert set(libs) == set(pins)
    assert libs["tensorflow"]["purl"] == f"pkg:pypi/tensorflow@{pins['tensorflow'].version}"
    numpy_hashes = {h["content"] for h in libs["numpy"]["hashes"]}
    if libs["numpy"]["properties"][0]["value"].startswith("not identified"):
        assert numpy_hashes == set(pins["numpy"].hashes)
    else:  # the installed wheel is known: its one hash, which the lock allows
        assert len(numpy_hashes) == 1 and numpy_hashes <= set(pins["numpy"].hashes)
    assert {f["name"] for f in model["components"]} >= {
        "model.keras",
        "saved_model/saved_model.pb",
    }
    assert bom["metadata"]["timestamp"] and bom["serialNumber"].startswith("urn:uuid:")
    assert any(d["ref"] == "model" and d["dependsOn"] for d in bom["dependencies"])
    (data,) = by_type["data"]
    assert data["data"][0]["contents"]["url"].startswith("pkg:pypi/scikit-learn@")


def test_slsa_provenance_names_model_inputs_and_every_link(lone_bundle):
    import base64
    import hashlib

    bundle, _ = lone_bundle
    env = json.loads((bundle / "attestations/provenance.intoto.json").read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]}
    assert (
        subjects["package/model.keras"]
        == hashlib.sha256((bundle / "artifacts/package/model.keras").read_bytes()).hexdigest()
    )
    build = stmt["predicate"]["buildDefinition"]
    assert build["buildType"] == "https://chainproof.dev/buildtypes/ml-pipeline/v1"
    names = {d["name"] for d in build["resolvedDependencies"]}
    assert {"config", "lock:main.txt", "dataset:sklearn-digits"} <= names
    run = stmt["predicate"]["runDetails"]
    assert run["builder"]["id"] and run["metadata"]["invocationId"]
    links = {f"attestations/{p.name}" for p in (bundle / "attestations").glob("*.link")}
    assert links <= {b["name"] for b in run["byproducts"]}
    # portable: no builder path, no file: URI; the dataset's uri is a purl
    text = json.dumps(stmt)
    assert "file:" not in text and str(ROOT) not in text
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    assert deps["dataset:sklearn-digits"]["uri"].startswith("pkg:pypi/scikit-learn@")
    assert "dirty" in deps["code"]["annotations"]


def test_load_verified_returns_a_working_model(lone_bundle):
    import numpy as np

    from pipeline import load_verified

    bundle, fp = lone_bundle
    model = load_verified(bundle, owner_key=fp)
    probs = model.predict(np.zeros((2, 8, 8, 1), dtype=np.float32), verbose=0)
    assert probs.shape == (2, 10)


def test_load_verified_refuses_a_tampered_file_without_touching_keras(lone_bundle):
    bundle, fp = lone_bundle
    model = bundle / "artifacts/package/model.keras"
    data = bytearray(model.read_bytes())
    data[-200] ^= 1
    model.write_bytes(bytes(data))
    code = (
        "import sys\n"
        "from pipeline import load_verified, Error\n"
        f"try:\n    load_verified({str(bundle)!r}, owner_key={fp!r})\n"
        "except Error as e:\n    print('refused:', e.check)\n"
        "print('keras imported:', 'keras' in sys.modules or 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "refused: artifacts on disk" in out.stdout, out.stderr
    assert "keras imported: False" in out.stdout


def test_serve_refuses_a_tampered_bundle(lone_bundle):
    bundle, fp = lone_bundle
    (bundle / "artifacts/package/metrics.json").write_text("{}")
    proc = chainproof("serve", bundle, "--owner-key", fp, "--port", str(free_port()), timeout=120)
    assert proc.returncode == 1
    assert "verification FAILED" in proc.stderr and "metrics.json" in proc.stderr


def test_serve_answers_predictions_over_http(lone_bundle):
    bundle, fp = lone_bundle
    port = free_port()
    server = subprocess.Popen(
        [
            "timeout",
            "300",
            *CHAINPROOF,
            "serve",
            str(bundle),
            "--owner-key",
            fp,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data[:20] / 16).reshape(20, 8, 8, 1).tolist()
        req = urllib.request.Request(
            f"{url}/predict",
            data=json.dumps({"instances": x}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert len(body["predictions"]) == 20 and len(body["predictions"][0]) == 10
        correct = sum(int(a == b) for a, b in zip(body["classes"], digits.target[:20], strict=True))
        assert correct >= 10, "a trained model, not noise"
        meta = json.loads(urllib.request.urlopen(f"{url}/metadata", timeout=10).read())
        assert meta["verified"] is True and meta["input_shape"] == [8, 8, 1]
        bad = urllib.request.Request(
            f"{url}/predict",
            data=b'{"instances": [[1, 2]]}',
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=10)
        assert info.value.code == 422
        # hostile values: NaN, 1e38 and unscaled 0..16 pixels are refused without an echo
        flat = [round(float(v) / 16, 6) for v in digits.data[0]]
        for poison in ("NaN", "1e38", "16.0"):
            body = json.dumps({"instances": [flat[:-1]]})[:-3] + f", {poison}]]}}"
            req = urllib.request.Request(
                f"{url}/predict", data=body.encode(), headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=10)
            assert info.value.code == 422, poison
            answer = info.value.read().decode()
            assert str(flat[10]) not in answer and poison not in answer, answer
        # a 108 MB body is refused by its Content-Length, before the server reads any of it
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(108 * 1000 * 1000))
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
        assert json.loads(urllib.request.urlopen(f"{url}/openapi.json", timeout=10).read())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}/docs", timeout=10)
        assert info.value.code == 404
    finally:
        server.terminate()
        server.wait(20)


def test_refused_deploy_publishes_nothing_and_leaves_the_alias(
    completed_workspace, tmp_path, monkeypatch
):
    """A deploy refused midway: no release directory, no staging left, alias unchanged."""
    from pipeline.config import load_config
    from pipeline.errors import StageFailed
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace
    from tests.conftest import FAST_PIPELINE, write_config

    ws = tmp_path / "ws"
    shutil.copytree(completed_workspace, ws, symlinks=True)
    cfg = load_config(write_config(tmp_path, FAST_PIPELINE))
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlruns.db")
    before = client.get_model_version_by_alias("digits-fast", "production").version

    original = Runner.run_stage

    def tampering(self, stage):
        link = original(self, stage)
        if stage.name == "package":  # an attacker swaps the card between package and deploy
            card = self.run_dir / "package" / "model_card.json"
            card.write_text(card.read_text().replace("Demonstration", "Anything"))
        return link

    monkeypatch.setattr(Runner, "run_stage", tampering)
    runner = Runner(cfg, Workspace(ws))
    with pytest.raises(StageFailed) as info:
        runner.run()
    assert "refusing to deploy" in info.value.log_tail
    releases = sorted(
        p.name for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()
    )
    assert releases == [bundle_of(completed_workspace).name], "nothing new, nothing half-made"
    after = client.get_model_version_by_alias("digits-fast", "production").version
    assert after == before


MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def their_verify(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            MODEL_SIGNING,
            "verify",
            "key",
            "artifacts/package",
            "--signature",
            "attestations/model.sig",
            "--public_key",
            "keys/release-ec.pub.pem",
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_openssf_model_signing_cli_accepts_the_release(lone_bundle):
    bundle, _ = lone_bundle
    proc = their_verify(bundle)
    assert proc.returncode == 0, proc.stderr
    assert "Verification succeeded" in proc.stdout + proc.stderr
    card = bundle / "artifacts/package/model_card.md"
    card.write_text(card.read_text() + "\nedited\n")
    assert their_verify(bundle).returncode != 0, "their verifier rejects a changed file too"


def test_a_release_key_the_layout_does_not_name_is_refused(lone_bundle, tmp_path):
    from pipeline.provenance.keys import RELEASE_KEY, RELEASE_PUB, init_release_key
    from pipeline.provenance.openssf import sign_model_dir

    bundle, fp = lone_bundle
    other = tmp_path / "other-keys"
    other.mkdir()
    init_release_key(other)
    shutil.copyfile(other / RELEASE_PUB, bundle / "keys" / RELEASE_PUB)
    sign_model_dir(
        bundle / "artifacts/package", bundle / "attestations/model.sig", other / RELEASE_KEY
    )
    assert their_verify(bundle).returncode == 0, "on its own, a re-signed bundle looks fine..."
    err = fails(bundle, fp)
    assert err.check == "model signature" and "layout names" in err.message  # ...but not to us


@pytest.mark.parametrize(
    "removed",
    [
        "attestations/checks/models.intoto.json",
        "attestations/checks/dependencies.intoto.json",
        "attestations/provenance.intoto.json",
        "attestations/model.sig",
        "locks/main.txt",
    ],
)
def test_a_bundle_stripped_of_its_evidence_fails(lone_bundle, removed):
    bundle, fp = lone_bundle
    (bundle / removed).unlink()
    err = fails(bundle, fp)
    assert err.check in ("attestations", "provenance", "model signature", "locks"), err


def test_a_signed_statement_copied_from_another_chain_is_refused(lone_bundle, completed_workspace):
    bundle, fp = lone_bundle
    from pipeline.provenance.keys import load_signer
    from pipeline.provenance.statements import TEST_RESULT, statement, write_signed_statement

    functionary = load_signer("functionary", completed_workspace / "attestations" / "keys")
    stmt = statement({"x": "0" * 64}, TEST_RESULT, {"result": "PASSED", "url": "elsewhere"})
    write_signed_statement(bundle / "attestations/extra.intoto.json", stmt, functionary.signer)
    err = fails(bundle, fp)
    assert err.check == "attestations" and "binds to nothing" in err.message


def test_symlinks_and_stray_links_in_a_bundle_are_refused(lone_bundle, tmp_path):
    bundle, fp = lone_bundle
    (bundle / "artifacts/deploy/etc").symlink_to("/etc")
    assert fails(bundle, fp).check == "layout of files"
    (bundle / "artifacts/deploy/etc").unlink()
    link = next((bundle / "attestations").glob("train.*.link"))
    shutil.copyfile(link, bundle / "attestations" / "train.deadbeef.link")
    assert fails(bundle, fp).check == "links present"


@pytest.mark.parametrize(
    ("target", "content"),
    [("attestations/root.layout", "{}"), ("keys/release-ec.pub.pem", "junk"), ("locks/sub", None)],
)
def test_malformed_bundle_files_are_errors_not_crashes(lone_bundle, target, content):
    bundle, fp = lone_bundle
    path = bundle / target
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    proc = chainproof("verify", bundle, "--owner-key", fp)
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr
