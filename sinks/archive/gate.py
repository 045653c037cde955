"""The release gate: does a release have enough passing eval evidence on both suites?

Exit codes for CI/CD: 0 pass, 1 fail, 2 too little evidence. A known failure outranks missing
evidence: a release that fails CURRENT is a fail even if HISTORICAL has too few cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PASS, FAIL, INSUFFICIENT = 0, 1, 2
SUITES = ("current", "historical")


@dataclass(frozen=True)
class SuiteEvidence:
    suite: str
    cases: int
    verdicts: int
    passed: int

    @property
    def pass_rate(self) -> float:
        return self.passed / self.verdicts


@dataclass(frozen=True)
class GateResult:
    code: int
    reasons: tuple[str, ...]

    @property
    def verdict(self) -> str:
        return {PASS: "PASS", FAIL: "FAIL", INSUFFICIENT: "INSUFFICIENT EVIDENCE"}[self.code]


def evaluate_gate(
    evidence: Mapping[str, SuiteEvidence], min_pass_rate: float, min_cases: int
) -> GateResult:
    """Judge each suite: enough distinct cases, then a pass rate at or above the floor."""
    failed, missing, passed = [], [], []
    for suite in SUITES:
        found = evidence.get(suite)
        if found is None or found.verdicts == 0:
            missing.append(f"{suite}: no verdicts (need {min_cases} cases)")
        elif found.cases < min_cases:
            missing.append(
                f"{suite}: {found.cases} cases, need {min_cases} "
                f"(pass rate so far {found.pass_rate:.1%})"
            )
        elif found.pass_rate < min_pass_rate:
            failed.append(
                f"{suite}: pass rate {found.pass_rate:.1%} ({found.passed}/{found.verdicts}) "
                f"is below {min_pass_rate:.1%}"
            )
        else:
            passed.append(
                f"{suite}: pass rate {found.pass_rate:.1%} ({found.passed}/{found.verdicts} "
                f"over {found.cases} cases) meets {min_pass_rate:.1%}"
            )
    if failed:
        return GateResult(FAIL, tuple(failed + missing + passed))
    if missing:
        return GateResult(INSUFFICIENT, tuple(missing + passed))
    return GateResult(PASS, tuple(passed))


#: How many known loops or releases a hint names.
HINT_NAMES = 10


def unknown_hint(loop: str, release: str, known: list[tuple[str, str]]) -> str | None:
    """What to say when the archive has no verdicts of ``release`` in ``loop``: a misspelt
    loop or release reads as too little evidence otherwise. ``known``: the (loop, release)
    pairs that have verdicts, newest release first."""
    if (loop, release) in known:
        return None
    loops = sorted({k for k, _ in known})
    if loop not in loops:
        return f"the archive has no eval verdicts of loop {loop!r}; " + named("loops", loops)
    releases = [r for k, r in known if k == loop]
    return f"loop {loop} has no eval verdicts of release {release!r}; " + named(
        "its releases, newest first", releases
    )


def named(what: str, names: list[str]) -> str:
    """``what: a, b, c`` (the first HINT_NAMES), for a message about a name not found."""
    if not names:
        return "it has none of any"
    shown = ", ".join(names[:HINT_NAMES])
    more = f" and {len(names) - HINT_NAMES:,} more" if len(names) > HINT_NAMES else ""
    return f"{what}: {shown}{more}"


KNOWN_QUERY = """
SELECT loop, release FROM v_release_quality
GROUP BY loop, release ORDER BY loop, max(last_verdict_at) DESC, release
"""

GATE_QUERY = """
SELECT suite, cases, verdicts, passed FROM v_release_quality
WHERE loop = ? AND release = ?
"""
