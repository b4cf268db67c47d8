"""The one error hierarchy of chainproof: every failure a user can act on is an `Error`.

Each category carries its own process exit code; only the CLI turns errors into exits.
"""

from __future__ import annotations


class Error(Exception):
    """Root of every chainproof error. `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        text = self.message
        if self.hint:
            text += f"\n  what to do: {self.hint}"
        return text


class VerificationError(Error):
    """The chain of attestations does not hold. Names the check, step, rule and artifact."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        check: str,
        step: str | None = None,
        rule: str | None = None,
        artifact: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.check = check
        self.step = step
        self.rule = rule
        self.artifact = artifact

    def diagnostics(self) -> str:
        lines = [f"verification FAILED: {self.message}", f"  check:    {self.check}"]
        if self.step:
            lines.append(f"  step:     {self.step}")
        if self.rule:
            lines.append(f"  rule:     {self.rule}")
        if self.artifact:
            lines.append(f"  artifact: {self.artifact}")
        if self.hint:
            lines.append(f"  what to do: {self.hint}")
        return "\n".join(lines)


class InputError(Error):
    """Bad input from the user: arguments, files, paths."""

    exit_code = 2


class ConfigError(InputError):
    """A pipeline config that does not validate. Each problem names file, line and key."""

    def __init__(self, path: str, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        first = problems[0]
        super().__init__(f"{path}:{first.line}: {first.key}: {first.message}")

    def diagnostics(self) -> str:
        lines = [f"invalid config {self.path} ({len(self.problems)} problem(s)):"]
        for p in self.problems:
            where = f"{self.path}:{p.line}" if p.line else self.path
            lines.append(f"  {where}: {p.key or '<top>'}: {p.message}")
        lines.append("  nothing was run; fix the config and try again (README: config reference)")
        return "\n".join(lines)


class ConfigProblem:
    """One problem in a config: where (line, dotted key) and what was expected."""

    __slots__ = ("line", "key", "message")

    def __init__(self, line: int | None, key: str, message: str) -> None:
        self.line = line
        self.key = key
        self.message = message

    def __repr__(self) -> str:
        return f"ConfigProblem(line={self.line}, key={self.key!r}, message={self.message!r})"


class EnvironmentDrift(Error):
    """The interpreter does not match the lock the stage must run under."""

    exit_code = 3

    def __init__(self, lock: str, diff: list[str], *, hint: str | None = None) -> None:
        self.lock = lock
        self.diff = diff
        shown = "\n".join(f"  {line}" for line in diff[:40])
        more = f"\n  ... and {len(diff) - 40} more" if len(diff) > 40 else ""
        super().__init__(
            f"environment drift against {lock} ({len(diff)} difference(s)):\n{shown}{more}",
            hint=hint or "rebuild the environment from the lock: `make setup` (or rm -rf .venv)",
        )


class StageFailed(Error):
    """A stage exited non-zero, timed out, or did not produce what it declared."""

    exit_code = 4

    def __init__(self, stage: str, message: str, *, log_tail: str = "", hint: str | None = None):
        self.stage = stage
        self.log_tail = log_tail
        super().__init__(f"stage '{stage}' failed: {message}", hint=hint)

    def diagnostics(self) -> str:
        text = super().diagnostics()
        if self.log_tail:
            text += "\n  last lines of its log:\n" + "\n".join(
                f"    | {line}" for line in self.log_tail.splitlines()
            )
        return text
