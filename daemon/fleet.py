"""A daemon among others on one PostgreSQL journal: its lease, the jobs it takes over, and the pauses
and 429 holds it shares; and, for any daemon, the journal's database going away and coming back.

What one daemon learns from the provider about the wallet, the key or its rate limit is true for all
(the limits are per API key), so it is written to the journal (meta `fleet_gate`) and each daemon's
submit gate follows it within a second. Only the daemon that was refused probes; the others wait
`lease_seconds` longer, so a probe still goes out if that daemon dies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from .journal import Job, Journal
from .pacing import SubmitGate

log = structlog.get_logger("daemon.fleet")

SHARED_GATE_META = "fleet_gate"

RENEWALS_PER_LEASE = 4
RENEW_AT_MOST_EVERY = 2.0
"""Seconds: the lease is renewed this often at most (one UPDATE of one row), and more often when it is short."""

TAKEOVER_CHECK_SECONDS = 2.0
"""How often a daemon looks for jobs whose holder's lease lapsed (one indexed query)."""


@dataclass(frozen=True)
class SharedGate:
    """The fleet's view of the provider's refusals: written by the daemon that heard one."""

    by: str
    """The token of the daemon run that wrote it (it ignores its own record)."""
    reason: str | None
    """Why submits pause (empty wallet, key rejected); None: no pause, perhaps a 429 hold."""
    detail: str
    probe_at: float
    """Wall time of that daemon's next probe submit."""
    held_until: float
    """Wall time until which a 429 holds every submit."""


def encode(gate: SharedGate) -> str:
    return json.dumps(asdict(gate), sort_keys=True)


def decode(text: str | None) -> SharedGate | None:
    """The record, or None when there is none or it is unreadable (an unreadable one pauses nobody)."""
    if not text:
        return None
    try:
        return SharedGate(**json.loads(text))
    except (ValueError, TypeError):
        return None


def gate_record(gate: SharedGate | None, me: str, paused: bool, following: bool) -> str:
    """What following `gate` means for a daemon: 'pause' (or stay paused, probing later), 'resume',
    or '' (nothing to do). A pure decision; `Fleet.follow` acts on it."""
    if gate is not None and gate.by != me and gate.reason is not None:
        return "pause"
    return "resume" if paused and following else ""


class Fleet:
    """This daemon's part in the fleet: renews its lease, takes over lapsed runs' jobs, shares pauses."""

    def __init__(self, journal: Journal, gate: SubmitGate) -> None:
        self.journal = journal
        self.gate = gate
        self.following = False
        """The gate's pause was heard from another daemon (so it lifts when that one's record goes)."""
        self._next_takeover = 0.0
        self._next_renewal = 0.0
        self._lease_lost_said = False

    # ------------------------------------------------------------------ the lease and takeover

    def renew_if_due(self, now: float) -> None:
        """Renew this run's lease every RENEWALS_PER_LEASE-th of `lease_seconds` (at most every
        RENEW_AT_MOST_EVERY seconds): a renewal late by a busy pass or two still comes well within the lease."""
        if now < self._next_renewal:
            return
        self._next_renewal = now + min(RENEW_AT_MOST_EVERY, self.journal.lease_seconds / RENEWALS_PER_LEASE)
        if not self.journal.renew_lease() and not self._lease_lost_said:
            self._lease_lost_said = True
            log.error("fleet.lease_lost", detail="this daemon's run is no longer in the journal's list of daemons")

    def take_over_if_due(self, now: float, outage_ended_at: float | None) -> list[Job]:
        """Every TAKEOVER_CHECK_SECONDS, take over the jobs of runs whose lease lapsed. Not within
        `lease_seconds` of the database coming back: the others, cut off just as long, must first have
        had the time to renew theirs."""
        if now < self._next_takeover:
            return []
        if outage_ended_at is not None and now - outage_ended_at < self.journal.lease_seconds:
            return []
        self._next_takeover = now + TAKEOVER_CHECK_SECONDS
        taken = self.journal.take_over()
        if taken:
            log.warning("fleet.took_over", jobs=len(taken), job_ids=[j.id for j in taken][:20],
                        states=sorted({j.state.value for j in taken}),
                        detail="another daemon's lease lapsed: its jobs go on here from where they stood")
        return taken

    # ------------------------------------------------------------------ pauses and holds, shared

    def share(self, now: float, wall: float) -> None:
        """This daemon heard the provider (a submit answer, a refused poll): write what its gate now
        says for the others. A gate neither paused nor held removes the record: the wallet or key works."""
        gate = self.gate
        held_until = wall + (gate.held_until - now) if gate.held_until > now else 0.0
        if gate.paused:
            self.following = False  # its own pause now, probed by itself
            record = SharedGate(self.journal.token or "", gate.reason, gate.detail, wall + max(0.0, gate.until - now),
                                held_until)
            self.journal.set_meta(SHARED_GATE_META, encode(record))
        elif held_until:
            self.journal.set_meta(SHARED_GATE_META, encode(SharedGate(self.journal.token or "", None, "", 0.0,
                                                                      held_until)))
        elif self.journal.get_meta(SHARED_GATE_META) is not None:
            self.journal.set_meta(SHARED_GATE_META, None)

    def follow(self, now: float, wall: float) -> str | None:
        """Bring the gate in line with the fleet's record; returns the change to announce, if any."""
        record = decode(self.journal.get_meta(SHARED_GATE_META))
        gate = self.gate
        if record is not None and record.by != self.journal.token and record.held_until > wall:
            gate.held_until = max(gate.held_until, now + (record.held_until - wall))
        action = gate_record(record, self.journal.token or "", gate.paused, self.following)
        if action == "pause":
            # Probe only if the daemon that was refused has not probed by a lease after its time.
            probe = now + max(0.0, record.probe_at - wall) + self.journal.lease_seconds
            change = gate.follow_pause(record.reason, record.detail, now, probe)
            self.following = True
            return change
        if action == "resume":
            self.following = False
            return gate.follow_resume()
        return None


class Outage:
    """Whether the journal's database can be reached: said once when it goes and once when it is back.

    Stages that could not record what they did are remembered, so the loop can put their jobs back on
    a path that continues them (as a restart would) once the database answers again.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.down_since: float | None = None
        self.ended_at: float | None = None
        self._left: set[int] = set()

    def began(self, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = self.clock()
            log.error("journal.unavailable", error=str(exc),
                      detail="submits wait and every file stays where it is; retrying until the database is back")

    def left_behind(self, job_id: int) -> None:
        """A stage (on a worker thread) could not write its job's next state."""
        self._left.add(job_id)

    def ended(self) -> list[int] | None:
        """After a pass that reached the database: the jobs to look at again, or None if nothing was down."""
        if self.down_since is None and not self._left:
            return None
        if self.down_since is not None:
            log.info("journal.available", down_for=round(self.clock() - self.down_since, 1))
            self.ended_at = self.clock()
            self.down_since = None
        left, self._left = sorted(self._left), set()
        return left
