"""Why submits wait, said once in the log and kept in `status`.

Four things hold submits back, each with its own way of ending: the provider's refusals (an empty
wallet, a rejected key, a 429's hold; `pacing.SubmitGate` decides when to probe), the same refusals
heard by another daemon of the fleet, a person's pause, and a budget limit reached. The scheduler
tells `Pauses` what each answer said, and reads the gate, the budget and `by_person` before it
claims work; this module says what changed, what fixes it, and keeps the journal's record of it
(what `status` shows) in step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from . import control
from .api import PollAnswer, SubmitAnswer, SubmitVerdict
from .context import Context
from .fleet import Fleet
from .jobs import JobState
from .pacing import NO_BALANCE, SubmitGate
from .spending import SpendingLimit

log = structlog.get_logger("daemon.pauses")


class Pauses:
    """The provider's gate, the fleet's shared refusals, a person's pause and the budget's limits."""

    def __init__(self, ctx: Context, clock: Callable[[], float], wake: threading.Event) -> None:
        self.ctx = ctx
        self.clock = clock
        self.wake = wake
        self.max_in_flight = ctx.config.api.max_in_flight
        self.gate = SubmitGate(self.max_in_flight)
        """The provider's refusals and the in-flight limit they shrink."""
        self.spending = SpendingLimit(ctx.journal, lambda: self.ctx.wall(), on_change=self.record)
        """Daily and monthly limits on submits, from the ledger."""
        self.fleet = Fleet(ctx.journal, self.gate) if ctx.journal.store.shared else None
        """The other daemons sharing the journal's database (PostgreSQL); None on SQLite."""
        self.by_person = False
        """A person paused submits (`codeformer-daemon pause`, the dashboard): read from the journal
        once a second. Jobs already at the provider finish meanwhile."""

    @property
    def reason(self) -> str | None:
        """Why submits wait, as `status` says it: the provider's refusal first (it needs a fix), else
        a budget limit reached (it lifts by itself); a person's pause has its own line."""
        return self.gate.reason or self.spending.pause

    # ------------------------------------------------------------------ what the provider said

    def heard_submit(self, answer: SubmitAnswer, now: float, sent_at: float | None) -> None:
        """A submit's answer: a refusal may pause submits (and the fleet), an acceptance resume them."""
        change = self.gate.on_submit(answer, now, sent_at)
        self._announce(change, answer.message)
        if change is not None or answer.verdict in (SubmitVerdict.NO_BALANCE, SubmitVerdict.AUTH) \
                or answer.http_status == 429:
            self._share()

    def heard_poll_rejecting_the_key(self, answer: PollAnswer, now: float) -> None:
        """A poll refused for the key: no submit would be accepted either."""
        self._announce(self.gate.on_key_rejected_by_poll(answer.message, now), answer.message)
        self._share()

    def heard_poll_accepting_the_key(self) -> None:
        """A poll answered: the key works again (a pause for it ends without waiting for a probe)."""
        change = self.gate.on_key_accepted_by_poll()
        self._announce(change, "")
        if change is not None:
            self._share()

    def remind_if_due(self, now: float) -> None:
        """A long pause is said again now and then, with how many files wait for it."""
        gate = self.gate
        if gate.reminder_due(now):
            log.error("submits.still_paused", reason=gate.reason, detail=gate.detail,
                      paused_for=round(now - gate.paused_since), next_probe_in=round(max(0.0, gate.until - now), 1),
                      waiting=self.ctx.journal.count_in(JobState.PENDING), fix=self.fix_for(gate.reason))

    # ------------------------------------------------------------------ what others said

    def follow_fleet(self) -> None:
        """What another daemon heard from the provider (a pause, a 429's hold) holds this one too."""
        if self.fleet is not None:
            self._announce(self.fleet.follow(self.clock(), self.ctx.wall()), "another daemon of the fleet")

    def follow_person(self) -> None:
        """A person's pause or resume, from the journal (another process wrote it)."""
        paused = control.paused_by_person_since(self.ctx.journal) is not None
        if paused == self.by_person:
            return
        self.by_person = paused
        if paused:
            log.warning("submits.paused", reason=control.PAUSED_BY_PERSON,
                        detail="no new submits until resumed; jobs already at the provider finish",
                        fix="codeformer-daemon resume, or Resume on the dashboard")
        else:
            log.info("submits.resumed", by="a person")
            self.wake.set()

    # ------------------------------------------------------------------ saying it

    def record(self) -> None:
        """Keep `status` on why submits wait."""
        self.ctx.journal.set_meta(control.DAEMON_PAUSE_META, self.reason)

    def fix_for(self, reason: str | None) -> str:
        """What a person does about a pause: top up, or put a valid key where this daemon reads it."""
        if reason == NO_BALANCE:
            return "top up the provider wallet; submits resume by themselves"
        source = self.ctx.api.key_source
        if "environment" in source:
            return f"put a valid key in {source} and restart the daemon; the key is also re-checked by itself"
        if "credential" in source:  # systemd copies credentials only when the service starts
            return ("put a valid key in the file the unit's LoadCredential=api_key:… names (e.g. "
                    "/etc/codeformer-daemon/api_key), then systemctl restart codeformer-daemon; "
                    "the key is also re-checked by itself")
        return (f"put a valid key in {source}, then reload (systemctl reload codeformer-daemon, or send "
                "SIGHUP); the key is also re-checked by itself")

    def _share(self) -> None:
        """What this daemon heard from the provider, for the fleet's other daemons."""
        if self.fleet is not None:
            self.fleet.share(self.clock(), self.ctx.wall())

    def _announce(self, change: str | None, detail: str) -> None:
        """Say what the gate's change means, once, and keep `status` in step with it."""
        gate = self.gate
        if change == "paused":
            log.error("submits.paused", reason=gate.reason, detail=detail, next_probe_in=round(gate.delay, 1),
                      fix=self.fix_for(gate.reason))
            self.record()
        elif change == "resumed":
            log.info("submits.resumed")
            self.record()
        elif change == "rate_limited":
            log.warning("submits.rate_limited", detail=detail, in_flight_limit=gate.limit,
                        max_in_flight=self.max_in_flight)
        elif change == "all_rejected":
            log.error("submits.all_rejected", rejected_in_a_row=gate.rejected_in_a_row, last_error=detail,
                      hint="every recent file was refused as a bad request: the configuration is likely at "
                           "fault (restore parameters, api.base_url); fix it, then `codeformer-daemon retry --all`")
