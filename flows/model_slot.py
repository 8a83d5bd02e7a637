"""One retrain per model, whatever started it: a Prefect global concurrency limit per model.

Nightly, manual, work-pool and CLI runs of `retrain` all take the slot `retrain-<model>` (limit 1)
for their whole run, so two runs never train the same model at once. The flow creates the limit
when it is missing: `concurrency()` silently does nothing for a limit that does not exist, and
`strict=True` turns that into an error instead.

A run that finds the slot taken either waits (its state is `Running` named `AwaitingSlot` in the
run list until it gets the slot) or skips with the reason. Compare-and-swap on the pointer stays
the last line of defence: runs against different Prefect APIs (two temporary servers) do not share
a slot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.states import Running
from prefect.utilities.engine import propose_state_sync

try:  # where 3.9 defines it; the sync module re-exports it in some releases
    from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError
except ImportError:  # pragma: no cover
    from prefect.concurrency.sync import AcquireConcurrencySlotTimeoutError

OnBusy = Literal["wait", "skip"]
WAITING_STATE = "AwaitingSlot"
# With on_busy="skip", how long to try for a slot that looked free (one API call on a loaded machine).
_PROBE_SECONDS = 5.0
# The holder renews its lease every 0.75 x this; a run killed with SIGKILL frees the slot when it expires.
_LEASE_SECONDS = 600.0


def slot_name(model: str) -> str:
    return f"retrain-{model}"


def ensure_slot(model: str) -> str:
    """Create the model's limit (1 slot) if it does not exist; an existing one is left as configured."""
    name = slot_name(model)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # another run created it in between: fine if it exists now
                client.read_global_concurrency_limit_by_name(name)
    return name


@contextmanager
def model_slot(model: str, on_busy: OnBusy, timeout_minutes: float, logger: logging.LoggerAdapter) -> Iterator[str | None]:
    """Hold the model's retrain slot for the block. Yields None when held, or the reason the run
    should skip instead (the slot was busy and `on_busy` is "skip", or the wait timed out)."""
    name = ensure_slot(model)
    waiting, holder = False, ""
    if _taken(name):
        holder = _running_retrain(model)
        if on_busy == "skip":
            yield f"another retrain of {model} holds the slot {name}{holder} (on_busy=skip)"
            return
        logger.info(
            "[INCREMENTAL] Waiting for the retrain slot of %s: another run is training it%s (on_busy=wait, up to %g min)",
            model, holder, timeout_minutes,
        )  # fmt: skip
        _set_state_name(WAITING_STATE)
        waiting = True
    # "skip" still waits a moment: a slot that looked free can be taken in between.
    timeout = timeout_minutes * 60 if on_busy == "wait" else _PROBE_SECONDS
    with ExitStack() as stack:
        try:
            stack.enter_context(_slot(name, timeout))
        except AcquireConcurrencySlotTimeoutError:
            if on_busy == "skip":
                yield f"another retrain of {model} took the slot {name} first (on_busy=skip)"
            else:
                yield f"waited {timeout_minutes:g} min for the slot {name} of {model}; another retrain still holds it{holder}"
            return
        finally:
            if waiting:
                _set_state_name(None)
        if waiting:
            logger.info("[INCREMENTAL] Got the retrain slot of %s", model)
        yield None


def _taken(name: str) -> bool:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots >= limit.limit


def _slot(name: str, timeout_seconds: float):
    # strict: a missing limit is an error, not a silent pass. A brief API outage while a long training
    # renews its lease must not kill the training: compare-and-swap still guards the pointer.
    return concurrency(
        name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=_LEASE_SECONDS, strict=True,
        raise_on_lease_renewal_failure=False,
    )  # fmt: skip


def _set_state_name(name: str | None) -> None:
    """Show in the run list that this run waits (Running named AwaitingSlot), then that it runs."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    state = Running(name=name) if name else Running()
    with get_client(sync_client=True) as client:
        propose_state_sync(client, state, flow_run_id=context.flow_run.id)


def _running_retrain(model: str) -> str:
    """' (run NAME)' for a running retrain of `model` other than this one, best effort, for the log line."""
    context = FlowRunContext.get()
    me = context.flow_run.id if context and context.flow_run else None
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
                limit=20,
            )
    except Exception:  # only decoration for a log line
        return ""
    for run in runs:
        if run.id != me and run.state_name != WAITING_STATE and run.parameters.get("model") in (model, None):
            return f" (run '{run.name}')"
    return ""
