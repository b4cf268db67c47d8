"""The offline vulnerability database: OSV records in one SQLite file, indexed by PyPI package.

`import_osv` loads a directory of OSV records (JSON or YAML, recursively, e.g. a checkout of
github.com/pypa/advisory-database) or an osv.dev ecosystem export (`all.zip`), `update` fetches
that export, and `VulnDB` reads the store. A store is written whole to a temporary file and
renamed into place, so a reader never sees a half-imported database. Its metadata says what is
in it: a content digest (sha256 over the sorted per-record digests, so the same records give the
same digest whatever the source layout), the record count, the newest `modified`, when and from
where it was imported.

Malicious-package records (OpenSSF, `MAL-` ids) import the same way. The sha256 of each file
their `affected[].database_specific.indicators.package_integrity` lists is indexed too, so a
lock or an installed distribution carrying one of those files is caught under any name.

Age: `check_age` measures how old the *data* is from the newest `modified` timestamp among the
records (falling back to the import time only when no record has one). Importing an old snapshot
today does not make it fresh, so import time alone would hide exactly the staleness that matters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from pipeline import bounded
from pipeline.errors import Error, InputError
from pipeline.fsutil import atomic_write_bytes
from pipeline.scan.osv import record_problem

OSV_PYPI_EXPORT = "https://osv-vulnerabilities.storage.googleapis.com/PyPI/all.zip"
DEFAULT_MAX_AGE = timedelta(days=30)
SCHEMA_VERSION = "2"  # 2: the integrity table (file hashes of malicious packages)
ECOSYSTEM = "PyPI"
MALICIOUS_PREFIX = "MAL-"
_RECORD_SUFFIXES = (".json", ".yaml", ".yml")

Progress = Callable[[str], None]


class ScanUnavailable(Error):
    """The vulnerability database cannot be used, so nothing could be scanned (exit 5).

    Never to be read as "no vulnerabilities": a scan that did not happen is not clean.
    """

    exit_code = 5


class UpdateFailed(ScanUnavailable):
    """Downloading the OSV export failed (no network, HTTP error, or a corrupt download)."""


@dataclass(frozen=True)
class DBInfo:
    """What a store holds and where it came from."""

    path: Path
    digest: str
    records: int
    withdrawn: int
    packages: int
    newest_modified: str | None
    imported_at: str
    source: str
    schema: str
    malicious: int = 0  # records with MAL- ids (OpenSSF Malicious Packages)
    file_hashes: int = 0  # distinct malicious-file sha256s indexed

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class StaleDatabase:
    """A warning the caller can print: the data is older than the configured maximum age."""

    path: Path
    age: timedelta
    max_age: timedelta
    measured_from: str  # "newest modified" | "import time"
    since: str

    def message(self) -> str:
        return (
            f"vulnerability database {self.path} is {self.age.days} days old "
            f"({self.measured_from} {self.since}; limit {self.max_age.days} days): "
            "advisories published since then are missing. Refresh it with "
            "`chainproof vulndb update` (or `chainproof vulndb import` of a newer export)."
        )


# --------------------------------------------------------------------------- reading sources


def _yaml_loader() -> type:
    """A safe YAML loader that leaves every scalar but null/bool a string.

    OSV values are strings; YAML 1.1 would turn `modified: 2023-11-07T20:24:23Z` into a
    datetime and an unquoted version `1.10` into the float 1.1, silently changing a version.
    The C loader is used when PyYAML has it, for speed.
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dropped = {f"tag:yaml.org,2002:{t}" for t in ("float", "int", "timestamp")}

    class OSVLoader(base):  # type: ignore[misc,valid-type]
        pass

    OSVLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in dropped]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    return OSVLoader


def _load_yaml(data: bytes, loader: type, where: str) -> Any:
    """An OSV record in YAML, within pipeline.bounded's nesting and alias-expansion caps."""
    import yaml

    try:
        text = data.decode("utf-8")
        bounded.compose_yaml(text, source=where)  # refuses alias bombs and deep nesting first
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from e
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML: {e}") from e


def _load_json(data: bytes, where: str) -> Any:
    try:
        return bounded.loads_json(data, source=where)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: not valid JSON: {e}") from e


def _member(zf: zipfile.ZipFile, name: str, where: str) -> bytes:
    """One record of an export zip, refused past the record cap before it is inflated."""
    cap = bounded.RECORD_BYTES
    limit = cap.value()
    size = zf.getinfo(name).file_size
    if size <= limit:
        with zf.open(name) as fh:
            data = fh.read(limit + 1)  # the header may lie: never inflate past the cap
        if len(data) <= limit:
            return data
    raise bounded.LimitExceeded(
        f"{where} expands past {cap.describe(limit)}", cap=cap, limit=limit, source=where
    )


def _iter_source(source: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed document) for each record file of a directory, zip, or single file."""
    if source.is_dir():
        loader = None
        for path in _record_files(source):
            where = str(path)
            data = bounded.read_bytes(path, what="OSV record")
            if path.suffix == ".json":
                yield where, _load_json(data, where)
            else:
                loader = loader or _yaml_loader()
                yield where, _load_yaml(data, loader, where)
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith(".json"):
                    where = f"{source}!{name}"
                    yield where, _load_json(_member(zf, name, where), where)
    elif source.is_file() and source.suffix in _RECORD_SUFFIXES:
        data = bounded.read_bytes(source, what="OSV record")
        if source.suffix == ".json":
            yield str(source), _load_json(data, str(source))
        else:
            yield str(source), _load_yaml(data, _yaml_loader(), str(source))
    else:
        raise InputError(
            f"{source} is not a directory of OSV records, an OSV export zip, or a record file",
            hint="e.g. chainproof vulndb import advisory-database/vulns  (or all.zip from osv.dev)",
        )


def _record_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git and friends
        if len(Path(dirpath).relative_to(root).parts) >= 32:  # os.walk recurses: bounded
            dirnames[:] = []
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(_RECORD_SUFFIXES))
    return sorted(found)


def _as_records(where: str, doc: Any) -> list[dict[str, Any]]:
    docs = doc if isinstance(doc, list) else [doc]
    for d in docs:
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not d["id"]:
            raise InputError(f"{where}: not an OSV record (an object with a string 'id')")
        problem = record_problem(d)
        if problem:
            raise InputError(
                f"{where}: record {d['id']} is not valid OSV: {problem}",
                hint="fix or remove that file (schema: https://ossf.github.io/osv-schema/); "
                "nothing was imported",
            )
    return docs


def _plain(value: Any) -> Any:
    """JSON-safe copy; anything YAML produced that JSON lacks (dates) becomes a string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


# --------------------------------------------------------------------------- import

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE record (
    id TEXT PRIMARY KEY,
    modified TEXT NOT NULL,
    withdrawn TEXT,
    sha256 TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE affects (package TEXT NOT NULL, record_id TEXT NOT NULL,
                      PRIMARY KEY (package, record_id)) WITHOUT ROWID;
CREATE TABLE integrity (sha256 TEXT NOT NULL, record_id TEXT NOT NULL, package TEXT NOT NULL,
                        filename TEXT NOT NULL,
                        PRIMARY KEY (sha256, record_id, filename)) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class _Row:
    id: str
    modified: str
    withdrawn: str | None
    sha256: str
    body: str
    packages: frozenset[str]
    integrity: frozenset[tuple[str, str, str]] = frozenset()  # (sha256, package, filename)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _integrity(affected: Any, package: str) -> set[tuple[str, str, str]]:
    """(sha256, package, filename) of each file an affected entry's indicators list."""
    specific = affected.get("database_specific") if isinstance(affected, dict) else None
    indicators = specific.get("indicators") if isinstance(specific, dict) else None
    files = indicators.get("package_integrity") if isinstance(indicators, dict) else None
    out = set()
    for f in files if isinstance(files, list) else []:
        hashes = f.get("hashes") if isinstance(f, dict) else None
        digest = hashes.get("sha256") if isinstance(hashes, dict) else None
        if isinstance(digest, str) and _SHA256.match(digest.lower()):
            out.add((digest.lower(), package, str(f.get("filename") or "")[:300]))
    return out


def _row(record: dict[str, Any]) -> _Row:
    body = json.dumps(_plain(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    packages = set()
    integrity: set[tuple[str, str, str]] = set()
    for affected in record.get("affected") or []:
        pkg = (affected or {}).get("package") or {}
        if pkg.get("ecosystem") == ECOSYSTEM and isinstance(pkg.get("name"), str):
            packages.add(canonicalize_name(pkg["name"]))
            integrity |= _integrity(affected, canonicalize_name(pkg["name"]))
    withdrawn = record.get("withdrawn")
    return _Row(
        id=record["id"],
        modified=str(_plain(record.get("modified") or "")),
        withdrawn=str(_plain(withdrawn)) if withdrawn else None,
        sha256=hashlib.sha256(body.encode("utf-8")).hexdigest(),
        body=body,
        packages=frozenset(packages),
        integrity=frozenset(integrity),
    )


def content_digest(record_digests: Iterable[str]) -> str:
    """sha256 over the sorted record digests, one per line: independent of source order."""
    h = hashlib.sha256()
    for d in sorted(record_digests):
        h.update(d.encode("ascii") + b"\n")
    return h.hexdigest()


def import_osv(
    source: Path | Sequence[Path],
    db_path: Path,
    *,
    source_label: str | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> DBInfo:
    """Import every OSV record under `source` (one path or several, e.g. the PyPA advisories
    and the OpenSSF malicious packages) into a new store at `db_path` (replacing it).

    Two records with the same id (e.g. a directory holding two copies) keep the newer
    `modified`. Records of other ecosystems are stored but not indexed, so they never match.
    """
    sources = [source] if isinstance(source, Path) else list(source)
    if not sources:
        raise InputError("nothing to import", hint="pass an OSV directory or all.zip")
    for s in sources:
        if not s.exists():
            raise InputError(f"{s} does not exist", hint="pass an OSV directory or all.zip")
    rows: dict[str, _Row] = {}
    n = 0
    for one in sources:
        for where, doc in _iter_source(one):
            n += 1
            for record in _as_records(where, doc):
                row = _row(record)
                old = rows.get(row.id)
                if old is None or (row.modified, row.sha256) > (old.modified, old.sha256):
                    rows[row.id] = row
            if progress and n % 2000 == 0:
                progress(f"read {n} files")
    label = " + ".join(map(str, sources))
    if not rows:
        raise InputError(
            f"{label}: no OSV records found (looked for *.json, *.yaml, *.yml)",
            hint="point at the directory that holds the records, e.g. advisory-database/vulns",
        )
    meta = {
        "schema": SCHEMA_VERSION,
        "digest": content_digest(r.sha256 for r in rows.values()),
        "records": str(len(rows)),
        "withdrawn": str(sum(1 for r in rows.values() if r.withdrawn)),
        "packages": str(len({p for r in rows.values() for p in r.packages})),
        "malicious": str(sum(1 for r in rows.values() if r.id.startswith(MALICIOUS_PREFIX))),
        "file_hashes": str(len({h[0] for r in rows.values() for h in r.integrity})),
        "newest_modified": _newest(r.modified for r in rows.values()),
        "imported_at": _iso(now or datetime.now(UTC)),
        "source": source_label or label,
    }
    data = _build(rows.values(), meta)
    atomic_write_bytes(db_path, data)
    if progress:
        progress(f"imported {len(rows)} records into {db_path}")
    return _info_from_meta(db_path, meta)


def _newest(stamps: Iterable[str]) -> str:
    """The latest parseable timestamp, normalised; "" when none parses."""
    parsed = [t for t in (_parse_time(s) for s in stamps if s) if t is not None]
    return _iso(max(parsed)) if parsed else ""


def _build(rows: Iterable[_Row], meta: dict[str, str]) -> bytes:
    """The whole store as bytes: built in memory in one transaction, then serialised."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(_SCHEMA)
        rows = sorted(rows, key=lambda r: r.id)
        with con:
            con.executemany(
                "INSERT INTO record VALUES (?, ?, ?, ?, ?)",
                ((r.id, r.modified, r.withdrawn, r.sha256, r.body) for r in rows),
            )
            con.executemany(
                "INSERT INTO affects VALUES (?, ?)",
                ((p, r.id) for r in rows for p in sorted(r.packages)),
            )
            con.executemany(
                "INSERT INTO integrity VALUES (?, ?, ?, ?)",
                ((h, r.id, p, f) for r in rows for h, p, f in sorted(r.integrity)),
            )
            con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        return con.serialize()
    finally:
        con.close()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- update


def update(
    db_path: Path,
    *,
    url: str = OSV_PYPI_EXPORT,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> DBInfo:
    """Download osv.dev's PyPI export and import it into `db_path`."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".osv-download-", suffix=".zip", dir=db_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(url, out, timeout=timeout, progress=progress)
        if not zipfile.is_zipfile(tmp):
            raise UpdateFailed(f"{url} did not return a zip archive", hint=_OFFLINE_HINT)
        return import_osv(tmp, db_path, source_label=url, progress=progress)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


_OFFLINE_HINT = (
    "import offline instead: fetch "
    f"{OSV_PYPI_EXPORT} on a machine that can, copy it here and run "
    "`chainproof vulndb import all.zip`; or import a directory of OSV records, e.g. a checkout "
    "of github.com/pypa/advisory-database: `chainproof vulndb import advisory-database/vulns`"
)


def _download(url: str, out: Any, *, timeout: float, progress: Progress | None) -> None:
    import urllib.error
    import urllib.request  # http.client, ssl, email: ~10 ms that only a download needs

    if progress:
        progress(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - https URL
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise UpdateFailed(
            f"downloading {url} failed: HTTP {e.code} {e.reason}", hint=_OFFLINE_HINT
        ) from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UpdateFailed(
            f"cannot download {url}: the network is not reachable ({reason})",
            hint=_OFFLINE_HINT,
        ) from e


# --------------------------------------------------------------------------- reading the store


class VulnDB:
    """A read-only handle on a store. Opening checks it is present, readable and not empty."""

    def __init__(self, path: Path, con: sqlite3.Connection, info: DBInfo) -> None:
        self.path = path
        self._con = con
        self.info = info

    @classmethod
    def open(cls, path: Path) -> VulnDB:
        if not path.is_file():
            raise ScanUnavailable(
                f"no vulnerability database at {path}: nothing was scanned",
                hint="create it: `chainproof vulndb update` (online) or "
                "`chainproof vulndb import PATH` (offline; a dir of OSV records or all.zip)",
            )
        con = None
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            count = con.execute("SELECT count(*) FROM record").fetchone()[0]
        except sqlite3.Error as e:
            if con is not None:
                con.close()
            raise ScanUnavailable(
                f"vulnerability database {path} is unreadable ({e}): nothing was scanned",
                hint="re-create it with `chainproof vulndb import` or `chainproof vulndb update`",
            ) from e
        if meta.get("schema") != SCHEMA_VERSION or count == 0:
            con.close()
            problem = (
                "is empty"
                if count == 0
                else f"has schema {meta.get('schema')!r} (this chainproof reads {SCHEMA_VERSION!r})"
            )
            raise ScanUnavailable(
                f"vulnerability database {path} {problem}: nothing was scanned",
                hint="re-create it with `chainproof vulndb import` or `chainproof vulndb update`",
            )
        return cls(path, con, _info_from_meta(path, meta))

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> VulnDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records_for(self, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Canonical package name -> every record (withdrawn included) that names it."""
        wanted = sorted({canonicalize_name(n) for n in names})
        out: dict[str, list[dict[str, Any]]] = {n: [] for n in wanted}
        cache: dict[str, dict[str, Any]] = {}
        # Chunked IN (...) queries: one round trip per 500 names, under SQLite's variable cap.
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._con.execute(
                "SELECT a.package, r.id, r.body FROM affects a JOIN record r ON r.id = a.record_id"
                f" WHERE a.package IN ({marks}) ORDER BY a.package, r.id",
                chunk,
            )
            for package, rid, body in rows:
                if rid not in cache:
                    cache[rid] = self._load(rid, body)
                out[package].append(cache[rid])
        return out

    def _load(self, rid: str, body: str) -> dict[str, Any]:
        """A stored record, re-checked: the store file is only as trustworthy as its disk."""
        try:
            record = json.loads(body)
        except ValueError:
            record = None
        problem = record_problem(record) if isinstance(record, dict) else "not a JSON object"
        if problem:
            raise ScanUnavailable(
                f"vulnerability database {self.path} holds a malformed record {rid} ({problem}): "
                "nothing was scanned",
                hint="re-create it with `chainproof vulndb import` or `chainproof vulndb update`",
            )
        return record

    def records_for_hashes(
        self, hashes: Iterable[str]
    ) -> dict[str, list[tuple[dict[str, Any], str, str]]]:
        """sha256 -> [(record, package it was published as, filename)] for each known file."""
        wanted = sorted({h.lower() for h in hashes})
        out: dict[str, list[tuple[dict[str, Any], str, str]]] = {}
        cache: dict[str, dict[str, Any]] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._con.execute(
                "SELECT i.sha256, i.package, i.filename, r.id, r.body FROM integrity i"
                f" JOIN record r ON r.id = i.record_id WHERE i.sha256 IN ({marks})"
                " ORDER BY i.sha256, r.id, i.filename",
                chunk,
            )
            for digest, package, filename, rid, body in rows:
                if rid not in cache:
                    cache[rid] = self._load(rid, body)
                out.setdefault(digest, []).append((cache[rid], package, filename))
        return out

    def record(self, record_id: str) -> dict[str, Any] | None:
        row = self._con.execute("SELECT body FROM record WHERE id = ?", (record_id,)).fetchone()
        return json.loads(row[0]) if row else None


def _info_from_meta(path: Path, meta: dict[str, str]) -> DBInfo:
    return DBInfo(
        path=path,
        digest=meta.get("digest", ""),
        records=int(meta.get("records", "0")),
        withdrawn=int(meta.get("withdrawn", "0")),
        packages=int(meta.get("packages", "0")),
        malicious=int(meta.get("malicious", "0")),
        file_hashes=int(meta.get("file_hashes", "0")),
        newest_modified=meta.get("newest_modified") or None,
        imported_at=meta.get("imported_at", ""),
        source=meta.get("source", ""),
        schema=meta.get("schema", ""),
    )


def info(db_path: Path) -> DBInfo:
    """Metadata of the store at `db_path` (ScanUnavailable if missing, unreadable or empty)."""
    with VulnDB.open(db_path) as db:
        return db.info


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def check_age(
    db: DBInfo, *, max_age: timedelta = DEFAULT_MAX_AGE, now: datetime | None = None
) -> StaleDatabase | None:
    """A StaleDatabase warning when the data is older than `max_age`, else None.

    Age is measured from the newest record `modified` (how current the advisories are); only a
    store whose records carry no usable `modified` falls back to its import time.
    """
    now = now or datetime.now(UTC)
    newest = _parse_time(db.newest_modified) if db.newest_modified else None
    if newest is not None:
        since, measured_from = newest, "newest modified"
    else:
        imported = _parse_time(db.imported_at)
        if imported is None:
            return None
        since, measured_from = imported, "import time"
    age = now - since
    if age <= max_age:
        return None
    return StaleDatabase(db.path, age, max_age, measured_from, _iso(since))
