"""What a screen runs and when it fails: the policy, from a config's screen stage or a file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import bounded
from pipeline.scan.data.interface import KINDS, DataScreenError

DetectorName = Literal[
    "labels", "backdoor", "duplicates", "balance", "outliers", "spectral", "activation-clustering"
]
Kind = Literal[
    "label-issue", "backdoor", "duplicate", "near-duplicate", "leak", "outlier", "class-imbalance"
]
DEFAULT_DETECTORS: tuple[DetectorName, ...] = ("labels", "backdoor", "duplicates", "balance")


def _default_fail_at() -> dict[Kind, float]:
    # backdoor: clean digits has ~7 rows (0.4%) past the z threshold, 5% BadNets poison adds 9
    return {"backdoor": 0.005, "label-issue": 0.02, "leak": 0.0, "duplicate": 0.01}


class ScreenPolicy(BaseModel):
    """Detectors, their thresholds, and the share of rows per kind that fails the screen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detectors: tuple[DetectorName, ...] = Field(DEFAULT_DETECTORS, min_length=1)
    # kind -> fraction of the screened rows at or over which the screen fails (at least one
    # row); a kind not named here is reported and never fails.
    fail_at: dict[Kind, float] = Field(default_factory=_default_fail_at)
    action: Literal["fail", "warn"] = "fail"
    backdoor_z: float = Field(10.0, gt=0, description="robust z at which a row is a backdoor")
    spectral_z: float = Field(10.0, gt=0)
    outlier_z: float = Field(8.0, gt=0)
    near_duplicate: float = Field(0.05, ge=0, lt=1, description="of the median NN distance")
    imbalance_ratio: float = Field(0.2, gt=0, le=1)
    seed: int = 0

    def threshold_rows(self, kind: str, rows: int) -> int | None:
        """Rows of `kind` at which the screen fails, or None when the kind never fails."""
        if kind not in self.fail_at:
            return None
        return max(1, int(-(-self.fail_at[kind] * rows // 1)))  # ceil, at least one row


def load_policy(path: Path) -> ScreenPolicy:
    """A policy file (YAML or JSON: the screen stage's params), read within the config caps."""
    try:
        data = bounded.read_yaml(path, what="screen policy", max_bytes=bounded.CONFIG_BYTES)
    except OSError as e:
        raise DataScreenError(f"cannot read the policy {path}: {e.strerror}") from e
    if data is None:
        data = {}
    try:
        return ScreenPolicy.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in e.errors()
        )
        raise DataScreenError(
            f"invalid screen policy {path}: {problems}",
            hint=f"keys: {', '.join(ScreenPolicy.model_fields)}; kinds: {', '.join(KINDS)}",
        ) from e
