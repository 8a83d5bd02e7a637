"""Gate task: the pure decision, run as a task so the verdict shows in the run's graph, logs and artifacts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from incremental.config import GatePolicy
from incremental.gate import Decision, GateEvidence, decide
from incremental.reporting import verdict_table_rows


@task(name="gate-candidate", cache_policy=NO_CACHE)
def gate_candidate(evidence: GateEvidence | None, policy: GatePolicy, version: str) -> Decision:
    decision = decide(evidence, policy)
    logger = get_run_logger()
    logger.info("[INCREMENTAL] Gate verdict: %s", decision.verdict.value.upper())
    for check in decision.checks:
        mark = {"pass": "✅", "fail": "❌", "inconclusive": "❔", "too few rows": "❔"}.get(check.outcome.value, "·")
        logger.info("[INCREMENTAL]   %s %s", mark if check.gated else "·", check.reason)
    create_table_artifact(
        verdict_table_rows(decision.checks),
        description=f"Gate verdict for {version}: {decision.verdict.value} (metric, slice, parent, candidate, delta, interval, verdict)",
    )
    return decision
