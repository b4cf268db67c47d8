"""Verification: one readable orchestrator over small named checks, as in in-toto's verifier.

Order: layout signature (owner key) -> layout expiry -> links present and well-formed ->
link signatures (functionary keys the layout names) -> expected commands (enforced) ->
return values -> training workers (provenance/workers.py) -> artifact rules
(MATCH/REQUIRE/CREATE/DISALLOW) -> artifacts on disk -> inspections. The first failing check
raises VerificationError naming the step, the rule and the artifact.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from in_toto import settings as intoto_settings
from in_toto import verifylib
from in_toto.exceptions import (
    LayoutExpiredError,
    RuleVerificationError,
    SignatureVerificationError,
)
from in_toto.models.layout import Inspection, Layout
from in_toto.models.link import Link
from in_toto.models.metadata import Metadata
from securesystemslib.exceptions import FormatError

from pipeline.errors import InputError, VerificationError
from pipeline.hashing import Walk, hash_stated, walk_tree
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.layout import INSPECTION_COMMAND, INSPECTION_NAME, LayoutPins, pins_of
from pipeline.provenance.links import link_filename, load_metadata, load_metadata_payload
from pipeline.provenance.workers import verify_workers


@dataclass
class VerifyReport:
    """What was checked, in order; returned only when every check passed."""

    target: str
    owner_keyid: str
    checks: list[tuple[str, str]] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)
    layout: Layout | None = None
    pins: LayoutPins | None = None
    run_id: str | None = None  # the one run every link names
    trust: str = ""  # where the trusted owner key came from
    release: dict[str, Any] | None = None  # a bundle's signed name, version, run, publication

    def passed(self, check: str, detail: str) -> None:
        self.checks.append((check, detail))


@dataclass(frozen=True)
class DiskArtifacts:
    """Where to find the recorded artifacts on disk, and which must be there."""

    root: Path
    # every recorded artifact must exist (a run) or only those present are checked (a bundle)
    require_all: bool = True
    # in a bundle: these products must be present (the released files)
    required_steps: tuple[str, ...] = ()
    # the tree already walked by the caller (a bundle's artifacts/, from its one walk)
    walked: Walk | None = field(default=None, compare=False)

    @cached_property
    def tree(self) -> Walk:
        """`root` walked once; the run-level checks after the chain reuse the same walk."""
        if self.walked is not None:
            return self.walked
        return walk_tree(self.root, digest_small=True)  # every file is hashed next


def _fail(message: str, check: str, **kw: Any) -> VerificationError:
    return VerificationError(message, check=check, **kw)


def safe_join(root: Path, name: str, *, check: str, step: str | None = None) -> Path:
    """`root / name` for a recorded artifact name, refusing names that leave `root`."""
    return Path(safe_path(str(root), name, check=check, step=step))


# path components that make a recorded name anything but a plain relative path
_NOT_PLAIN = frozenset(("", ".", ".."))


def safe_path(root: str, name: str, *, check: str, step: str | None = None) -> str:
    """safe_join as a string: the verifier joins ~50k recorded names per run, and Path
    objects cost more than the check. A plain name ("a/b.bin": no empty, "." or ".."
    component) is joined directly; anything else takes the PurePosixPath route."""
    if name and "\\" not in name and "\x00" not in name and _NOT_PLAIN.isdisjoint(name.split("/")):
        return f"{root}/{name}"
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name:
        raise _fail(
            f"the recorded name {name!r} is not a plain relative path inside the tree",
            check,
            step=step,
            artifact=name,
            hint="a link or statement names a path outside what it attests; do not trust it",
        )
    return str(Path(root) / pure)


RENEW_HINT = (
    "the owner can extend a published release without touching its links: "
    "`chainproof release renew BUNDLE --days N` (owner key); a run is re-run instead"
)


def load_layout(
    path: Path,
    owner: PublicKey,
    report: VerifyReport,
    *,
    renewed_until: datetime | None = None,
) -> Layout:
    """The owner-signed layout at `path`; `renewed_until`: an owner-signed renewal's expiry."""
    try:
        metadata = load_metadata(path, what="layout")
    except FileNotFoundError:
        raise _fail(f"layout {path} is missing", "layout signature", artifact=str(path)) from None
    except (InputError, OSError) as e:  # load_metadata turns every bad shape into InputError
        raise _fail(
            f"layout {path} is not valid in-toto metadata ({e})",
            "layout signature",
            artifact=str(path),
        ) from e
    try:
        verifylib.verify_metadata_signatures(metadata, {owner.keyid: owner.legacy_dict()})
    except (SignatureVerificationError, FormatError) as e:
        raise _fail(
            f"the layout is not signed by the trusted owner key {owner.keyid[:16]}…",
            "layout signature",
            artifact=str(path),
            hint="the layout was altered or re-signed by someone else; do not trust this chain",
        ) from e
    report.passed("layout signature", f"signed by owner {owner.keyid[:16]}…")
    layout = metadata.get_payload()
    if not isinstance(layout, Layout):
        raise _fail(f"{path} holds a link, not a layout", "layout signature", artifact=str(path))
    try:
        verifylib.verify_layout_expiration(layout)
        report.passed("layout expiry", f"valid until {layout.expires}")
    except LayoutExpiredError as e:
        if renewed_until is None or renewed_until <= datetime.now(UTC):
            until = (
                f", and its renewal on {renewed_until:%Y-%m-%dT%H:%M:%SZ}" if renewed_until else ""
            )
            raise _fail(
                f"the layout expired on {layout.expires}{until}",
                "layout expiry",
                artifact=str(path),
                hint=RENEW_HINT,
            ) from e
        report.passed(
            "layout expiry",
            f"expired {layout.expires}, renewed by the owner until "
            f"{renewed_until:%Y-%m-%dT%H:%M:%SZ}",
        )
    report.layout = layout
    report.pins = pins_of(layout)
    return layout


def _load_links(layout: Layout, link_dir: Path) -> dict[str, dict[str, tuple[Metadata, Any]]]:
    """Per step and key: the link's metadata and its payload, parsed once (not yet trusted)."""
    steps: dict[str, dict[str, tuple[Metadata, Any]]] = {}
    for step in layout.steps:
        found: dict[str, tuple[Metadata, Any]] = {}
        for keyid in step.pubkeys:
            path = link_dir / link_filename(step.name, keyid)
            if not path.exists():
                continue
            try:
                found[keyid] = load_metadata_payload(path, what="link")
            except (InputError, OSError) as e:
                raise _fail(
                    f"link {path.name} is not valid in-toto metadata ({e})",
                    "link format",
                    step=step.name,
                    artifact=str(path),
                ) from e
        if len(found) < step.threshold:
            strays = sorted(p.name for p in link_dir.glob(f"{step.name}.*.link"))
            extra = (
                f"; found only {', '.join(strays)}, signed by keys the layout does not name"
                if strays
                else ""
            )
            raise _fail(
                f"no link for step '{step.name}' from the functionary key(s) "
                f"the layout names{extra}",
                "links present",
                step=step.name,
                artifact=str(link_dir / link_filename(step.name, step.pubkeys[0])),
                hint="the step did not run to completion, or its link was removed or replaced",
            )
        steps[step.name] = found
    return steps


def _verify_link_signatures(
    layout: Layout, loaded: dict[str, dict[str, tuple[Metadata, Any]]], link_dir: Path
) -> dict[str, dict[str, Link]]:
    chain: dict[str, dict[str, Link]] = {}
    for step in layout.steps:
        chain[step.name] = {}
        for keyid, (metadata, payload) in loaded[step.name].items():
            key = layout.keys.get(keyid)
            try:
                if key is None:
                    raise SignatureVerificationError(f"key {keyid} not in layout")
                metadata.verify_signature(key)
            except (SignatureVerificationError, FormatError) as e:
                raise _fail(
                    f"the link for step '{step.name}' is not validly signed by functionary "
                    f"key {keyid[:16]}… named in the layout",
                    "link signatures",
                    step=step.name,
                    artifact=str(link_dir / link_filename(step.name, keyid)),
                    hint="the link was altered or signed by another key",
                ) from e
            # the payload parsed from the very bytes whose signature was just verified
            if not isinstance(payload, Link) or payload.name != step.name:
                raise _fail(
                    f"the signed metadata for step '{step.name}' is not a link for that step",
                    "link signatures",
                    step=step.name,
                    artifact=str(link_dir / link_filename(step.name, keyid)),
                )
            chain[step.name][keyid] = payload
    return chain


def _verify_commands(layout: Layout, reduced: dict[str, Link]) -> None:
    for step in layout.steps:
        got = list(reduced[step.name].command)
        if got != list(step.expected_command):
            raise _fail(
                f"step '{step.name}' ran {got}, but the layout expects {step.expected_command}",
                "expected command",
                step=step.name,
                rule=f"expected_command {step.expected_command}",
            )


def _verify_binding(reduced: dict[str, Link], report: VerifyReport) -> None:
    """Every link names the same run and config, and the digests the owner pinned.

    A link is bound to its run by its signed environment (run id, config and code digests),
    so links spliced in from another run — whatever run.json says — are refused.
    """
    pins = report.pins
    run_ids = {name: link.environment.get("run_id") for name, link in reduced.items()}
    if len(set(run_ids.values())) > 1:
        raise _fail(
            "the links come from different runs: "
            + ", ".join(f"{n}: {r}" for n, r in sorted(run_ids.items())),
            "run binding",
            step=next(n for n, r in run_ids.items() if r != next(iter(run_ids.values()))),
            rule="every link names the same run",
            hint="links were spliced in from another run; do not trust this chain",
        )
    run_id = next(iter(run_ids.values()), None)
    if pins is not None and pins.run_id is not None and run_id != pins.run_id:
        raise _fail(
            f"the links name run {run_id}, but the layout was signed for run {pins.run_id}",
            "run binding",
            rule="layout pins the run",
        )
    for name, link in reduced.items():
        env = link.environment
        config = env.get("config_sha256")
        if pins is not None and config != pins.config_sha256:
            raise _fail(
                f"step '{name}' ran config sha256 {str(config)[:16]}…, but the layout pins "
                f"{pins.config_sha256[:16]}…",
                "config pin",
                step=name,
                rule="layout pins the config",
            )
        code = (env.get("code") or {}).get("sha256")
        if pins is not None and pins.code_sha256 and code != pins.code_sha256:
            raise _fail(
                f"step '{name}' ran code sha256 {str(code)[:16]}…, but the layout pins "
                f"{pins.code_sha256[:16]}…",
                "code pin",
                step=name,
                rule="layout pins the code",
                hint="the code that made this chain is not the code the owner signed for",
            )
        lock = env.get("lock_sha256")
        if pins is not None and lock not in pins.locks.values():
            raise _fail(
                f"step '{name}' ran under lock sha256 {str(lock)[:16]}…, which the layout "
                "does not pin",
                "lock pin",
                step=name,
                rule="layout pins the locks",
            )
    report.run_id = run_id if isinstance(run_id, str) else None
    detail = f"every link names run {run_id}"
    if pins is not None:
        detail += f"; config, code and locks are the ones the layout pins ({pins.signed_by})"
    report.passed("run binding", detail)


def _verify_return_values(reduced: dict[str, Link]) -> None:
    for name, link in reduced.items():
        rv = link.byproducts.get("return-value")
        if rv != 0:
            raise _fail(
                f"step '{name}' recorded return value {rv!r}",
                "return values",
                step=name,
                rule="return-value == 0",
            )


_RULE = re.compile(r"^'([^']+)'")
_ARTIFACTS = re.compile(r"artifacts: (\[[^\]]*\])")


def _explain_rule_failure(
    e: RuleVerificationError, reduced: dict[str, Link], check: str = "artifact rules"
) -> VerificationError:
    trace = verifylib.RULE_TRACE
    step, kind = trace.get("source_name"), trace.get("source_type")
    text = str(e)
    rule = m.group(1) if (m := _RULE.match(text)) else text.splitlines()[0]
    artifacts = m.group(1) if (m := _ARTIFACTS.search(text)) else None
    detail = ""
    link = reduced.get(step) if step else None
    if link is not None and artifacts and rule.startswith("DISALLOW"):
        # Name the upstream product a material no longer matches: the usual tamper.
        recorded = link.materials if kind == "materials" else link.products
        for name, digest in recorded.items():
            if name not in artifacts:
                continue
            upstream = name.split("/", 1)[0]
            up = reduced.get(upstream)
            if up is not None and name in up.products and up.products[name] != digest:
                detail = (
                    f"; {name} in '{step}' {kind} has sha256 {digest.get('sha256', '?')[:16]}…, "
                    f"but step '{upstream}' produced sha256 "
                    f"{up.products[name].get('sha256', '?')[:16]}…"
                )
                break
    what = "inspection" if check == "inspections" else "step"
    return _fail(
        f"{what} '{step}': {kind} rule '{rule}' failed for {artifacts or 'the artifacts'}{detail}",
        check,
        step=step,
        rule=f"expected_{kind}: {rule}",
        artifact=artifacts,
        hint=INSPECTION_HINT if check == "inspections" else None,
    )


INSPECTION_HINT = (
    "a file in the run directory was added or changed after its step signed the link; "
    "do not use this run (in-toto-verify run from the run directory fails the same way)"
)


def _verify_disk(reduced: dict[str, Link], disk: DiskArtifacts, report: VerifyReport) -> None:
    wanted: dict[str, tuple[str, str, str]] = {}  # name -> (step, field, sha256)
    for step, link in reduced.items():
        for name, digest in link.materials.items():
            wanted.setdefault(name, (step, "materials", digest.get("sha256", "")))
        for name, digest in link.products.items():
            wanted[name] = (step, "products", digest.get("sha256", ""))
    tree = disk.tree
    root = str(disk.root)
    present: dict[str, tuple[str, os.stat_result | None]] = {}
    for name, (step, fieldname, _) in wanted.items():
        path = safe_path(root, name, check="artifacts on disk", step=step)
        st = tree.files.get(name)
        if st is not None:  # a regular file the walk saw: its stat is the one hashed
            present[name] = (path, st)
        elif os.path.isfile(path):  # through a symlink: judged as before, by the later checks
            present[name] = (path, None)
        elif disk.require_all or (fieldname == "products" and step in disk.required_steps):
            raise _fail(
                f"{name}, recorded in the {fieldname} of step '{step}', is missing on disk",
                "artifacts on disk",
                step=step,
                rule=f"{fieldname} recorded in the signed link",
                artifact=str(path),
            )
    if not disk.require_all:
        attested = set(wanted)
        linked = [n for n in tree.symlinks if (disk.root / n).is_file()]
        stray = [n for n in [*tree.files, *linked] if n not in attested]
        for name in sorted(stray, key=lambda n: n.split("/")):  # the first in Path order
            raise _fail(
                f"{name} is in the bundle but no link attests it",
                "artifacts on disk",
                rule="every released file must be a recorded product",
                artifact=str(disk.root / name),
            )
    names = list(present)
    digests = dict(
        zip(
            names,
            hash_stated([(p, os.stat(p) if st is None else st) for p, st in present.values()]),
            strict=True,
        )
    )
    for name, (path, _) in present.items():
        step, fieldname, expected = wanted[name]
        if digests[name] != expected:
            raise _fail(
                f"{name} on disk has sha256 {digests[name][:16]}…, but step '{step}' signed "
                f"{expected[:16]}… in its {fieldname}",
                "artifacts on disk",
                step=step,
                rule=f"{fieldname} recorded in the signed link",
                artifact=path,
                hint="the file was changed after it was attested; do not use it",
            )
    report.passed("artifacts on disk", f"{len(present)} file(s) match their signed digests")


def _check_inspections(layout: Layout) -> list[Inspection]:
    """The layout's inspections, each the exact one chainproof writes: we never run a command
    a layout names, we apply its rules ourselves; anything else is refused, not skipped."""
    inspections = layout.inspect if isinstance(layout.inspect, list) else [layout.inspect]
    for insp in inspections:
        name, run = getattr(insp, "name", None), getattr(insp, "run", None)
        if name != INSPECTION_NAME or run != INSPECTION_COMMAND:
            raise _fail(
                f"the layout's inspection {name!r} runs {run!r}, not the "
                f"inspection chainproof writes ({INSPECTION_NAME!r}: {INSPECTION_COMMAND})",
                "inspections",
                rule=f"inspection {name!r}",
                hint="chainproof never executes a command from a layout; this layout was not "
                "compiled by chainproof (`chainproof layout`)",
            )
    return list(inspections)


def _excluded(name: str) -> bool:
    """in-toto's default exclude patterns (*.link*, .git, *.pyc, *~), applied to each part of
    the name as its gitwildmatch does, so we see the directory as in-toto-verify records it."""
    patterns = intoto_settings.ARTIFACT_EXCLUDE_PATTERNS
    return any(fnmatch(part, p) for part in name.split("/") for p in patterns)


def _verify_inspections(
    inspections: list[Inspection],
    reduced: dict[str, Link],
    root: Path,
    report: VerifyReport,
    walk: Walk | None = None,
) -> None:
    """What in-toto-verify run from `root` would conclude, without running the command: its
    command does nothing, so the materials and products are the directory as it is.

    `walk`: the run's one walk (the disk check's); its stats key the digest cache, so the
    files the disk check hashed are not read again."""
    if not inspections:
        return
    walk = walk if walk is not None else walk_tree(root)
    names = sorted(n for n in walk.files if not _excluded(n))
    digests = hash_stated(walk.stated(names))
    artifacts = {n: {"sha256": d} for n, d in zip(names, digests, strict=True)}
    links: dict[str, Link] = dict(reduced)
    for insp in inspections:
        links[insp.name] = Link(name=insp.name, materials=artifacts, products=artifacts)
    try:
        verifylib.verify_all_item_rules(inspections, links)
    except RuleVerificationError as e:
        raise _explain_rule_failure(e, links, "inspections") from e
    except (FormatError, KeyError, TypeError, ValueError) as e:
        # owner-signed, yet not rules in-toto's grammar accepts (or naming a step not in
        # the layout): refuse, as in-toto-verify would, rather than crash
        raise _fail(
            f"the layout's inspection rules are not valid in-toto rules ({e!r})",
            "inspections",
            rule=f"inspection {INSPECTION_NAME!r}",
        ) from e
    report.passed(
        "inspections",
        f"{len(names)} file(s) in the run directory: every file under a step's directory is "
        "a product that step signed",
    )


def verify_chain(
    *,
    layout_path: Path,
    link_dir: Path,
    owner: PublicKey,
    disk: DiskArtifacts | None,
    only_steps: Iterable[str] | None = None,
    target: str = "",
    progress: Callable[[str], None] | None = None,
    renewed_until: datetime | None = None,
) -> VerifyReport:
    """Verify links in `link_dir` against the owner-signed layout, then the files on disk.

    `only_steps` verifies a prefix of the pipeline (the deploy gate checks what ran before
    it); the layout's signature and expiry are still checked on the whole layout first.
    """
    report = VerifyReport(target=target or str(link_dir), owner_keyid=owner.keyid)
    layout = load_layout(layout_path, owner, report, renewed_until=renewed_until)
    if only_steps is not None:
        keep = set(only_steps)
        layout.steps = [s for s in layout.steps if s.name in keep]
    loaded = _load_links(layout, link_dir)
    report.passed("links present", f"{len(loaded)} step(s): {', '.join(loaded)}")
    chain = _verify_link_signatures(layout, loaded, link_dir)
    report.passed("link signatures", "every link signed by a functionary the layout names")
    try:
        verifylib.verify_threshold_constraints(layout, chain)
    except Exception as e:  # in-toto raises ThresholdVerificationError here
        raise _fail(str(e), "thresholds") from e
    reduced = verifylib.reduce_chain_links(chain)
    _verify_commands(layout, reduced)
    report.passed("expected command", "every step ran the command the layout expects")
    _verify_binding(reduced, report)
    _verify_return_values(reduced)
    report.passed("return values", "every step exited 0")
    verify_workers(reduced, report, disk.root if disk is not None else None)
    try:
        verifylib.verify_all_item_rules(layout.steps, reduced)
    except RuleVerificationError as e:
        raise _explain_rule_failure(e, reduced) from e
    report.passed("artifact rules", "materials chain to upstream products; nothing undeclared")
    _check_inspections(layout)  # a foreign one is refused whatever is verified
    if disk is not None:
        _verify_disk(reduced, disk, report)
    report.links = reduced
    return report


def verify_inspections(report: VerifyReport, run_dir: Path, walk: Walk | None = None) -> None:
    """The layout's inspection over a whole run directory, after `verify_chain` passed.

    Only a run: a bundle carries only the released steps (its release manifest judges every
    file in it), and a prefix of the chain (the deploy gate) lacks the steps still to come.
    """
    if report.layout is not None:
        _verify_inspections(_check_inspections(report.layout), report.links, run_dir, report, walk)


def released_steps(
    layout_path: Path, owner: PublicKey, *, renewed_until: datetime | None = None
) -> list[str]:
    """Steps whose products a release bundle carries: the last step and those it MATCHes from."""
    layout = load_layout(
        layout_path,
        owner,
        VerifyReport(target="", owner_keyid=owner.keyid),
        renewed_until=renewed_until,
    )
    last = layout.steps[-1]
    sources = [r[5] for r in last.expected_materials if r[0] == "MATCH" and len(r) >= 6]
    return [*dict.fromkeys(sources), last.name]
