"""Gate task: the pure decision, run as a task so the verdict shows in the run's graph and logs."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from incremental.config import GatePolicy
from incremental.gate import Decision, EvalScores, decide


@task(name="gate-candidate", cache_policy=NO_CACHE)
def gate_candidate(candidate: EvalScores, parent: EvalScores, policy: GatePolicy) -> Decision:
    decision = decide(candidate, parent, policy)
    logger = get_run_logger()
    logger.info("[INCREMENTAL] Gate verdict: %s", decision.verdict.value.upper())
    for check in decision.checks:
        logger.info("[INCREMENTAL]   %s %s", "✅" if check.passed else "❌", check.reason)
    return decision
