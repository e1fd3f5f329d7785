"""The budget as the scheduler applies it: how many submits may start now, and the pause it makes.

`budget` decides from figures; this reads them (the ledger in the journal, summed again only when
it has grown or a day has turned, so an idle station does not read a month every pass), says once
when a limit pauses submits and once when it lifts, and keeps the budget in force in the journal for
`status`, the dashboard and /metrics, which read the journal, not the configuration file.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from . import budget, reports
from .config import BudgetConfig
from .journal import Journal, JobState

log = structlog.get_logger("daemon.scheduler")


class SpendingLimit:
    """Applies `budget.daily_limit` / `monthly_limit` to submits; `pause` says why they wait, if they do."""

    def __init__(self, journal: Journal, wall: Callable[[], float], on_change: Callable[[], None]) -> None:
        self.journal = journal
        self.wall = wall
        self.on_change = on_change
        """Called when the pause starts or lifts (the scheduler records it for `status`)."""
        self.pause: str | None = None
        """Why the budget holds submits back ("daily limit of 200 images reached"), else None."""
        self.resumes_at: float | None = None
        """While paused: the wall time its day or month ends (the loop wakes then by itself)."""
        self._ledger_read: tuple[tuple[int, budget.Periods], budget.Used] | None = None

    def record(self, config: BudgetConfig) -> None:
        """Keep the budget in force in the journal (at start and after each reload)."""
        self.journal.set_meta(budget.BUDGET_META, budget.encode(config))

    def allowance(self, config: BudgetConfig) -> int | None:
        """How many submits may start now (None: no limit set), from the ledger and the jobs being
        launched. Pauses submits when the ledger reaches a limit, and resumes them once a new day or
        month, a refund or a reload (a limit raised or removed) lifts it."""
        decision = budget.Allowance(None)
        if config.daily_limit is not None or config.monthly_limit is not None:
            when = budget.periods(self.wall(), config.timezone)
            launching = self.journal.count_in(JobState.PUBLISHING, JobState.SUBMITTING)
            decision = budget.allowance(config, self._ledger_used(when), launching, when)
        self.resumes_at = decision.resume_at
        if decision.reason != self.pause:
            lifted, self.pause = self.pause, decision.reason
            if decision.reason is not None:
                log.warning("submits.paused", reason=decision.reason,
                            resumes_at=budget.moment_text(decision.resume_at, config.timezone),
                            waiting=self.journal.count_in(JobState.PENDING),
                            fix="files wait in the inbox and go on by themselves then; to go on sooner, raise "
                                "or remove the limit in budget: and reload (systemctl reload codeformer-daemon)")
            else:
                log.info("submits.resumed", lifted=lifted)
            self.on_change()
        return decision.may_start

    def caps(self, config: BudgetConfig) -> list[tuple[int, float, float]]:
        """The limits in force now, for the journal's claim to check under its lock (see budget.caps).
        Asked at every claim: without a limit set, no day or month is worked out at all."""
        if config.daily_limit is None and config.monthly_limit is None:
            return []
        return budget.caps(config, budget.periods(self.wall(), config.timezone))

    def _ledger_used(self, when: budget.Periods) -> budget.Used:
        mark = (self.journal.last_charge_id(), when)
        if self._ledger_read is None or self._ledger_read[0] != mark:
            self._ledger_read = (mark, reports.ledger_used(self.journal, when))
        return self._ledger_read[1]
