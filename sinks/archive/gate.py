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


GATE_QUERY = """
SELECT suite, cases, verdicts, passed FROM v_release_quality
WHERE loop = ? AND release = ?
"""
