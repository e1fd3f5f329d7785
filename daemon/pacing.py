"""How fast to talk to the provider: when to poll a job, and when submits may go out.

Pure bookkeeping over the scheduler's clock: nothing here sleeps or sends. The scheduler asks
`SubmitGate.allowed()` before it fills free slots and tells the gate every submit answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .api import PollAnswer, PollVerdict, SubmitAnswer, SubmitVerdict

PREDICTION_MARGIN = 0.02
"""Seconds after a job's predicted completion at which to look (covers timer and network jitter)."""

FOLLOW_UP_WINDOW = 0.25
"""For this share of the expected time after the predicted finish, follow-up polls come quicker."""

NO_BALANCE = "insufficient balance"
KEY_REJECTED = "key rejected"

REJECTIONS_BEFORE_HINT = 3
"""This many 400s in a row, with nothing accepted in between, points at the configuration."""


def next_poll_time(now: float, sent_at: float | None, interval: float, expected: float | None) -> float:
    """When to poll a job next: every `interval`, plus right when the job is expected to finish.

    `expected` is the provider's typical processing time, learnt from its own completed_at -
    created_at, and `sent_at` is when the submit left. Just after the expected finish the job is
    looked at again after short, growing pauses for a little while (a job rarely runs exactly to
    the average), then the plain interval takes over. This cuts the wait after completion by far
    more than it adds polls.
    """
    grid = now + interval
    if expected is None or sent_at is None:
        return grid
    predicted = sent_at + expected + PREDICTION_MARGIN
    if now < predicted:
        return min(predicted, grid)
    overdue = now - predicted
    if overdue < expected * FOLLOW_UP_WINDOW:
        return min(grid, now + max(2 * PREDICTION_MARGIN, overdue))
    return grid


WEBHOOK_GRACE = 2.0
"""With a webhook, the safety poll comes this long (at least) after the job's predicted finish."""

WEBHOOK_SAFETY_INTERVAL = 15.0
"""With a webhook, a job past its safety poll is looked at this often (or at the plain interval,
if longer): enough to notice a lost call and the job timeout, without a poll stream per job."""

FIRST_SAFETY_POLL = 10.0
"""With a webhook and nothing learnt yet of the provider's time, the first look after this long."""


def next_safety_poll(now: float, sent_at: float | None, interval: float, expected: float | None,
                     job_timeout: float = float("inf")) -> float:
    """When to poll a job whose provider will call its webhook when it finishes: only as a safety net.

    The call itself triggers the one poll that matters. Without it, the job is looked at once a
    little after its predicted finish (`WEBHOOK_GRACE`, or half the expected time if longer), then
    every WEBHOOK_SAFETY_INTERVAL: a lost call costs a short delay. Never less often than four
    times per `job_timeout`, so a job the provider sits on or forgot is still seen to time out.
    """
    spacing = max(interval, min(WEBHOOK_SAFETY_INTERVAL, job_timeout / 4))
    if sent_at is None:
        return now + spacing
    if expected is None:
        first = sent_at + max(interval, min(FIRST_SAFETY_POLL, job_timeout / 4))
    else:
        first = sent_at + expected + max(WEBHOOK_GRACE, 0.5 * expected)
    return first if now < first else now + spacing


@dataclass
class PollEvidence:
    """What the provider's answers have said about one job in flight (wall-clock seconds).

    Only the provider's word counts. A poll that got no answer (network down, daemon stopped) says
    nothing, and neither does a passing overload (5xx, 429, 408): the job may well be finished and
    paid for, and be fetched once the provider is back.
    """

    still_waiting_at: float | None = None
    """When a poll last heard QUEUED or PROCESSING."""
    unusable_since: float | None = None
    """When the current run of answers with no usable status began (404, garbage), else None."""
    unusable_at: float | None = None
    """When the last of those came."""
    unusable_status: int | None = None
    unusable_message: str = ""

    def heard(self, http_status: int | None, usable: bool, waiting: bool, message: str, now: float) -> None:
        """Record one poll's answer (`http_status` None: no answer came)."""
        if not says_something(http_status):
            return
        if usable:
            self.unusable_since = self.unusable_at = self.unusable_status = None
            self.unusable_message = ""
            if waiting:
                self.still_waiting_at = now
            return
        if self.unusable_since is None:
            self.unusable_since = now
        self.unusable_at, self.unusable_status, self.unusable_message = now, http_status, message


PASSING_STATUSES = frozenset({408, 429})
"""Answers that speak of the provider's load, not of the job."""


def says_something(http_status: int | None) -> bool:
    """Whether an answer with this status is the provider's word about the job itself."""
    return http_status is not None and http_status < 500 and http_status not in PASSING_STATUSES


GONE_STATUSES = frozenset({404, 410})
"""Status answers that say the provider no longer has the job (purged, or never kept)."""


def overdue_reason(submitted_at: float, evidence: PollEvidence, job_timeout: float,
                   remote_status: str | None = None) -> tuple[str, str] | None:
    """(error kind, reason) when a job in flight has to be given up, else None.

    On the provider's own word only: a poll after the deadline still said QUEUED/PROCESSING, or
    for longer than `job_timeout` every answer was unusable (the provider forgot the id, or answers
    nonsense about it). Either way the job may have been paid for.
    """
    waited = (evidence.still_waiting_at or 0.0) - submitted_at
    if waited > job_timeout:
        return "timeout", f"still {remote_status or 'unfinished'} after api.job_timeout ({job_timeout:g} s)"
    if evidence.unusable_since is not None and evidence.unusable_at is not None:
        streak = evidence.unusable_at - max(evidence.unusable_since, submitted_at)
        if streak > job_timeout:
            if evidence.unusable_status in GONE_STATUSES:
                return "lost_at_provider", (
                    f"the provider no longer knows this job (it may have been paid): its status answered "
                    f"HTTP {evidence.unusable_status} for {streak:.0f} s, longer than api.job_timeout "
                    f"({job_timeout:g} s)")
            return "lost_at_provider", (
                f"the provider gave no usable status for this job for {streak:.0f} s, longer than "
                f"api.job_timeout ({job_timeout:g} s; it may have been paid); last answer: "
                f"{evidence.unusable_message}")
    return None


@dataclass
class _Followed:
    """One job in flight, as the poll plan follows it."""

    sent_at: float | None
    next_poll: float
    webhook: bool = False
    called_back: bool = False
    evidence: PollEvidence = field(default_factory=PollEvidence)


class PollPlan:
    """When each job in flight is polled next, what its polls have heard, and whether webhook calls
    arrive. Bookkeeping over the scheduler's clock only; the scheduler polls, logs and gives up jobs.

    A job submitted with a webhook is polled when its call comes, plus `next_safety_poll`s; once a
    job finishes without its call, webhooks are taken as not arriving and every job is polled at
    the usual pace (`next_poll_time`) until a call comes again.
    """

    def __init__(self, interval: float, job_timeout: float) -> None:
        self.interval = interval
        self.job_timeout = job_timeout
        self.expected: float | None = None
        """The provider's typical processing time, learnt from its completed answers."""
        self.webhooks_arrive = True
        self._jobs: dict[int, _Followed] = {}
        self._heard: set[int] = set()

    def _poll_time(self, job: _Followed, now: float) -> float:
        """A safety net while the job's call is expected; the usual pace otherwise (also once the call
        came: the job has changed, and an unusable answer is asked again soon)."""
        if job.webhook and self.webhooks_arrive and not job.called_back:
            return next_safety_poll(now, job.sent_at, self.interval, self.expected, self.job_timeout)
        return next_poll_time(now, job.sent_at, self.interval, self.expected)

    def submitted(self, job_id: int, sent_at: float, now: float, *, webhook: bool) -> None:
        job = self._jobs[job_id] = _Followed(sent_at, now, webhook=webhook)
        job.next_poll = self._poll_time(job, now)

    def called_back(self, job_id: int, now: float) -> bool:
        """The job's webhook call came: poll it now. True when calls arrive again after they had not."""
        job = self._jobs.setdefault(job_id, _Followed(None, now))
        job.called_back, job.next_poll = True, now
        regained, self.webhooks_arrive = not self.webhooks_arrive, True
        return regained

    def heard(self, job_id: int, answer: PollAnswer, now: float, wall: float) -> bool:
        """Record one poll's answer and plan the next. True when it shows that webhook calls do not
        arrive (a job finished without its call), the first time only."""
        if answer.verdict is PollVerdict.COMPLETED and answer.provider_seconds is not None:
            sample = answer.provider_seconds
            self.expected = sample if self.expected is None else 0.8 * self.expected + 0.2 * sample
        job = self._jobs.setdefault(job_id, _Followed(None, now))
        if answer.verdict is not PollVerdict.AUTH:
            self._heard.add(job_id)
            job.evidence.heard(answer.http_status, usable=answer.verdict is not PollVerdict.RETRY,
                               waiting=answer.verdict is PollVerdict.WAITING, message=answer.message, now=wall)
        if answer.verdict in (PollVerdict.WAITING, PollVerdict.RETRY, PollVerdict.AUTH):
            job.next_poll = max(now + (answer.retry_after or 0.0), self._poll_time(job, now))
            return False
        del self._jobs[job_id]  # finished at the provider (or failed there): nothing more to poll
        if job.webhook and not job.called_back and self.webhooks_arrive:
            self.webhooks_arrive = False
            for other in self._jobs.values():
                other.next_poll = min(other.next_poll, self._poll_time(other, now))
            return True
        return False

    def due(self, job_ids: Iterable[int], now: float) -> list[int]:
        """Of these submitted jobs (none of them being polled now), those to poll now. A job the plan
        does not know (submitted before a restart) is due at once."""
        return [job_id for job_id in job_ids
                if self._jobs.setdefault(job_id, _Followed(None, now)).next_poll <= now]

    def keep_only(self, job_ids: Collection[int]) -> None:
        """Forget the jobs no longer submitted (done, failed, timed out) or being polled."""
        for job_id in [j for j in self._jobs if j not in job_ids]:
            del self._jobs[job_id]

    def next_time(self, skip: Collection[int]) -> float | None:
        """The earliest poll due among the jobs not in `skip` (those being polled now)."""
        times = [job.next_poll for job_id, job in self._jobs.items() if job_id not in skip]
        return min(times) if times else None

    def take_heard(self) -> dict[int, PollEvidence]:
        """The jobs polled since the last call, with their evidence (for giving a job up)."""
        heard, self._heard = self._heard, set()
        return {job_id: self._jobs[job_id].evidence for job_id in heard if job_id in self._jobs}

    def hear_again(self, job_id: int) -> None:
        """Ask `take_heard` about this job once more (it was busy when asked)."""
        self._heard.add(job_id)


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0, min(cap, base * (2 ** max(0, attempt))))


class SubmitGate:
    """Decides how many submits may start now.

    Three reasons to hold back, each cleared by the provider's own answers:
    - **Paused** (402 empty wallet, 401/403 key rejected): every submit would fail the same way.
      One probe submit goes out each time the backoff runs out (doubling up to `max_delay`); an
      accepted submit opens the gate again. `reload()` (SIGHUP) probes at once.
    - **Held** after a 429: nothing goes out until its Retry-After (or a full-jitter backoff) passes.
    - **Window** (AIMD): a 429 halves the number of jobs allowed in flight (once per burst:
      only a submit sent after the last halving halves it again); each accepted submit grows it back by 1/window, so by one per window's worth of
      accepts. It never exceeds `max_in_flight`.
    """

    def __init__(self, max_in_flight: int, *, first_delay: float = 5.0, max_delay: float = 300.0,
                 reminder_every: float = 600.0, rng: random.Random | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.reminder_every = reminder_every
        self._rng = rng or random.Random()
        self.reason: str | None = None
        self.detail = ""
        self.paused_by_poll = False
        self.paused_since = 0.0
        self.until = 0.0
        """While paused: when the next probe may go out."""
        self.delay = 0.0
        self.probe_out = False
        self.next_reminder = 0.0
        self.window = float(max_in_flight)
        self.held_until = 0.0
        self.shrunk_at = float("-inf")
        self.rate_limited_in_a_row = 0
        self.rejected_in_a_row = 0

    # ------------------------------------------------------------------ questions

    @property
    def paused(self) -> bool:
        return self.reason is not None

    @property
    def limit(self) -> int:
        """Jobs allowed in flight now (the AIMD window, whole jobs, at least one)."""
        return max(1, min(self.max_in_flight, math.floor(self.window)))

    def allowed(self, now: float, free_slots: int) -> int:
        """How many of `free_slots` may start a submit now; a probe counts as handed out."""
        if now < self.held_until:
            return 0
        if not self.paused:
            return free_slots
        if self.probe_out or now < self.until:
            return 0
        self.probe_out = True
        return min(1, free_slots)

    def wake_at(self, now: float) -> float | None:
        """The next moment `allowed` could change its answer, for the scheduler's sleep."""
        times = [t for t in (self.held_until, self.until if self.paused and not self.probe_out else 0.0)
                 if t > now]
        return min(times) if times else None

    def reminder_due(self, now: float) -> bool:
        """True at most once per `reminder_every` while paused: time to say so again."""
        if not self.paused or now < self.next_reminder:
            return False
        self.next_reminder = now + self.reminder_every
        return True

    # ------------------------------------------------------------------ what happened

    def launch_ended_without_submit(self) -> None:
        """The probe's job never reached the provider (vanished, bad file, a twin): let another try."""
        self.probe_out = False

    def on_submit(self, answer: SubmitAnswer, now: float, sent_at: float | None = None) -> str | None:
        """Learn from one submit answer. Returns what a person should hear about, if anything:
        'paused', 'resumed', 'rate_limited' (the window shrank) or 'all_rejected'.

        `sent_at` is when that submit left: answers to submits sent before a pause or a shrink
        (several slots submit at once) neither lift the pause nor shrink the window again.
        """
        sent_at = now if sent_at is None else sent_at
        verdict = answer.verdict
        if verdict in (SubmitVerdict.NO_BALANCE, SubmitVerdict.AUTH):
            return self._pause(NO_BALANCE if verdict is SubmitVerdict.NO_BALANCE else KEY_REJECTED,
                               answer.message, now, sent_at)
        self.probe_out = False
        if verdict is SubmitVerdict.RETRY and answer.http_status == 429:
            return self._rate_limited(answer.retry_after, now, sent_at)
        if verdict is SubmitVerdict.REJECTED:
            self.rejected_in_a_row += 1
            return "all_rejected" if self.rejected_in_a_row == REJECTIONS_BEFORE_HINT else None
        if verdict is SubmitVerdict.ACCEPTED:
            self.rejected_in_a_row = 0
            self.rate_limited_in_a_row = 0
            self.window = min(float(self.max_in_flight), self.window + 1.0 / self.window)
            if self.paused and sent_at >= self.paused_since:
                self.reason = None
                return "resumed"
        return None

    def on_key_rejected_by_poll(self, message: str, now: float) -> str | None:
        """A poll was refused with 401/403: the key is bad for submits too."""
        change = self._pause(KEY_REJECTED, message, now, now)
        if change == "paused":
            self.paused_by_poll = True
        return change

    def on_key_accepted_by_poll(self) -> str | None:
        """A poll was answered (200): a pause that a refused poll began is over (the key works again).

        A pause begun by a refused submit waits for an accepted probe: the status endpoint taking
        the key proves nothing about the submit endpoint, and lifting it here would flap.
        """
        if self.reason == KEY_REJECTED and self.paused_by_poll:
            self.reason = None
            self.probe_out = False
            return "resumed"
        return None

    def follow_pause(self, reason: str, detail: str, now: float, probe_at: float) -> str | None:
        """Another daemon of the fleet was refused (daemon.fleet): pause as if this one had been, with
        its first probe at `probe_at`. 'paused' if that is news."""
        changed = self.reason != reason
        if changed:
            self.paused_since = now
            self.paused_by_poll = False
            self.next_reminder = now + self.reminder_every
            self.delay = self.first_delay
        self.reason, self.detail, self.until, self.probe_out = reason, detail, probe_at, False
        return "paused" if changed else None

    def follow_resume(self) -> str | None:
        """The daemon whose refusal paused this one saw a submit accepted: 'resumed' if this was paused."""
        if self.reason is None:
            return None
        self.reason, self.probe_out = None, False
        return "resumed"

    def reload(self, now: float) -> None:
        """The key or settings were reloaded: probe at once instead of waiting out the backoff."""
        if self.paused:
            self.until, self.delay, self.probe_out = now, 0.0, False

    # ------------------------------------------------------------------ helpers

    def _pause(self, reason: str, detail: str, now: float, sent_at: float) -> str | None:
        changed = self.reason != reason
        if not changed and sent_at < self.paused_since:
            return None  # the rest of the burst that caused the pause: not a failed probe
        self.delay = self.first_delay if changed or self.delay <= 0 else min(self.max_delay, self.delay * 2)
        if changed:
            self.paused_since = now
            self.paused_by_poll = False
            self.next_reminder = now + self.reminder_every
        self.reason, self.detail, self.until, self.probe_out = reason, detail, now + self.delay, False
        return "paused" if changed else None

    def _rate_limited(self, retry_after: float | None, now: float, sent_at: float) -> str | None:
        """429: hold every submit until Retry-After (or a jittered backoff); halve the window, but only
        for a submit sent after the last halving (one burst of 429s is one signal, as in TCP)."""
        self.rate_limited_in_a_row += 1
        wait = retry_after if retry_after is not None else full_jitter(
            self.rate_limited_in_a_row, base=1.0, cap=60.0, rng=self._rng)
        self.held_until = max(self.held_until, now + wait)
        if sent_at < self.shrunk_at:
            return None
        self.shrunk_at = now
        before = self.limit
        self.window = max(1.0, self.window / 2)
        return "rate_limited" if self.limit < before else None
