"""The scheduler: one loop that decides what runs next, and a small pool that runs it.

Each pass of the loop is a list of named steps (take new files, submit, poll, finish, heartbeat). The
loop never blocks on the network: stages run on the worker pool and report back through a queue.
Every job in flight is polled on its own clock; no thread is parked per job. At most
`api.max_in_flight` jobs hold a slot, and a freed slot is refilled at once (pipelined, not batched).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import stages
from .api import PollVerdict, SubmitVerdict
from .journal import FINAL_STATES, IN_FLIGHT_STATES, Job, JobState, StaleTransition
from .outbox import remove_temporaries
from .watcher import InboxWatcher

log = structlog.get_logger("daemon.scheduler")

CHECKS_AHEAD_AT_ONCE = 2
"""Preflights run ahead of free slots at once; few, so submits and polls keep the workers they need."""

LOOP_ERROR_PAUSE = 2.0
"""Seconds to pause after a pass failed as a whole, so a persistent fault does not spin."""

MAX_SLEEP = 0.5
"""The loop's longest nap: bounds how late it notices a stop flag set by a signal handler."""

PREDICTION_MARGIN = 0.02
"""Seconds after a job's predicted completion at which to look (covers timer and network jitter)."""

FOLLOW_UP_WINDOW = 0.25
"""For this share of the expected time after the predicted finish, follow-up polls come quicker."""


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


class SubmitGate:
    """Pauses every submit while the provider refuses them all (empty wallet, bad key).

    While paused, one probe submit is let through each time the backoff runs out; an accepted probe
    opens the gate again. Pure bookkeeping over the scheduler's clock.
    """

    def __init__(self, first_delay: float = 5.0, max_delay: float = 300.0) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.reason: str | None = None
        self.until = 0.0
        self.delay = 0.0
        self.probe_out = False

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def allowed(self, now: float, free_slots: int) -> int:
        if not self.paused:
            return free_slots
        if self.probe_out or now < self.until:
            return 0
        self.probe_out = True
        return min(1, free_slots)

    def launch_ended_without_submit(self) -> None:
        """The probe's job never reached the provider (vanished, bad file, a twin): let another try."""
        self.probe_out = False

    def on_submit(self, verdict: SubmitVerdict, now: float, message: str) -> str | None:
        """Update from one submit answer; returns 'paused' or 'resumed' when that changes."""
        if verdict in (SubmitVerdict.NO_BALANCE, SubmitVerdict.AUTH):
            reason = "insufficient balance" if verdict is SubmitVerdict.NO_BALANCE else "key rejected"
            changed = self.reason != reason
            self.delay = self.first_delay if changed else min(self.max_delay, self.delay * 2)
            self.reason, self.until, self.probe_out = reason, now + self.delay, False
            return "paused" if changed else None
        self.probe_out = False
        if self.paused and verdict is SubmitVerdict.ACCEPTED:
            self.reason = None
            return "resumed"
        return None


@dataclass
class _Running:
    job_id: int
    kind: str
    future: Future


class Scheduler:
    """Runs the pipeline until asked to stop."""

    def __init__(self, ctx: stages.Context, watcher: InboxWatcher, *, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic, workers: int | None = None) -> None:
        self.ctx = ctx
        self.watcher = watcher
        self.clock = clock
        api = ctx.config.api
        self.max_in_flight = api.max_in_flight
        self.poll_interval = api.poll_interval
        self.job_timeout = api.job_timeout
        # Room for every slot's launch or poll, every delivery of a finished job, and the checks
        # ahead: a freed slot's next launch must never queue behind downloads.
        self.pool = ThreadPoolExecutor(max_workers=workers or min(64, 2 * self.max_in_flight + CHECKS_AHEAD_AT_ONCE),
                                       thread_name_prefix="stage")
        self.wake = wake or threading.Event()
        self.stop_requested = False
        self.gate = SubmitGate()
        self._finished: queue.SimpleQueue[_Running] = queue.SimpleQueue()
        self._running: dict[int, _Running] = {}
        self._next_poll: dict[int, float] = {}
        self._submitted_clock: dict[int, float] = {}
        self._expected: float | None = None
        self._next_heartbeat = 0.0
        self._stage_errors: dict[int, int] = {}
        self.last_pass = clock()
        ctx.notify = self.wake.set
        ctx.stopping = lambda: self.stop_requested
        ctx.poll_now = self.poll_now
        self._poll_requests: queue.SimpleQueue[int] = queue.SimpleQueue()

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Recover what a previous run left, then loop until `stop()`; clean-up in `finally`."""
        try:
            self.recover()
        except Exception as exc:  # noqa: BLE001 - e.g. failed/ not writable: the loop retries those jobs
            log.error("recover.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        try:
            while not self.stop_requested:
                self.wake.clear()  # before the pass: a wake-up during it makes the next nap return at once
                try:
                    self.collect_finished()
                    self.take_new_files()
                    self.fail_overdue_jobs()
                    self.start_submits()
                    self.start_checks_ahead()
                    self.start_polls()
                    self.start_finishing()
                    self.heartbeat()
                except Exception as exc:  # noqa: BLE001 - e.g. the state disk is full: wait, then go on
                    log.error("loop.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
                    self.wake.wait(LOOP_ERROR_PAUSE)
                self.sleep_until_due()
        finally:
            self.ctx.journal.set_meta("paused", None)

    def request_stop(self) -> None:
        """Only sets a flag, so it is safe in a signal handler; the loop sees it within one pass."""
        self.stop_requested = True

    def stop(self) -> None:
        """Ask the loop to end after its current step, and wake it now (not from a signal handler)."""
        self.request_stop()
        self.wake.set()

    def drain(self, timeout: float) -> bool:
        """Let stages already running finish (their HTTP calls have timeouts); True if all did."""
        deadline = self.clock() + timeout
        for running in list(self._running.values()):
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            try:
                running.future.result(timeout=remaining)
            except Exception:  # noqa: BLE001 - already logged by the stage wrapper
                pass
        self.collect_finished()
        self.pool.shutdown(wait=False, cancel_futures=True)
        return not self._running

    # ------------------------------------------------------------------ steps

    def recover(self) -> None:
        """Put every job a previous run left mid-way back on a path that continues it."""
        journal = self.ctx.journal
        for job in journal.jobs_in(JobState.PUBLISHING):
            stages._unpublish(self.ctx, job)
            journal.transition(job, JobState.PENDING, "restart: publish again", hosted_key=None)
        for job in journal.jobs_in(JobState.SUBMITTING):
            journal.add_to_counter("ambiguous_at_restart")
            log.warning("job.ambiguous_at_restart", rel_path=job.rel_path, job_id=job.id)
            stages.fail(self.ctx, job, "submit_ambiguous",
                        "the daemon stopped while this file's submit was being sent; it is not resent "
                        "automatically so it cannot be paid for twice (drop it into the inbox again to resend)")
        keep = set()
        for job in journal.jobs_in(JobState.SUBMITTED):
            if job.hosted_key and job.upload_path:
                try:  # the provider may not have fetched it yet: serve it again under the same key
                    self.ctx.host.publish(job.hosted_key, Path(job.upload_path),
                                          "image/png" if job.hosted_key.endswith(".png") else "image/jpeg")
                    keep.add(job.hosted_key)
                except Exception as exc:  # noqa: BLE001 - a missing file only fails that job's fetch
                    log.warning("file.republish_failed", rel_path=job.rel_path, job_id=job.id, error=str(exc))
            log.info("job.resumed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id)
        swept = self.ctx.host.sweep(keep)
        removed = sum(remove_temporaries(p) for p in (self.ctx.folders.outbox, self.ctx.folders.archive,
                                                       self.ctx.folders.failed))
        if swept or removed:
            log.info("recover.cleaned", orphans_unpublished=swept, temporary_files_removed=removed)

    def collect_finished(self) -> None:
        """Hear back from finished stages: free their job, update the gate and the poll clocks."""
        now = self.clock()
        while True:
            try:
                running = self._finished.get_nowait()
            except queue.Empty:
                return
            self._running.pop(running.job_id, None)
            outcome = running.future.result()  # _run_stage never raises
            if outcome.submit is not None:
                self._on_submit(outcome, now)
            elif running.kind == "launch":
                self.gate.launch_ended_without_submit()
            if outcome.poll is not None:
                self._on_poll(outcome, now)

    def _on_submit(self, outcome: stages.StageOutcome, now: float) -> None:
        answer = outcome.submit
        if answer.verdict is SubmitVerdict.ACCEPTED:
            sent_at = outcome.sent_at if outcome.sent_at is not None else now
            self._submitted_clock[outcome.job_id] = sent_at
            self._next_poll[outcome.job_id] = next_poll_time(now, sent_at, self.poll_interval, self._expected)
        change = self.gate.on_submit(answer.verdict, now, answer.message)
        if change == "paused":
            log.error("submits.paused", reason=self.gate.reason, detail=answer.message,
                      next_probe_in=round(self.gate.delay, 1), fix=self._fix_for(self.gate.reason))
            self.ctx.journal.set_meta("paused", self.gate.reason)
        elif change == "resumed":
            log.info("submits.resumed")
            self.ctx.journal.set_meta("paused", None)

    @staticmethod
    def _fix_for(reason: str | None) -> str:
        if reason == "insufficient balance":
            return "top up the provider wallet; submits resume by themselves"
        return ("check the key in CODEFORMER_API_KEY, api.api_key_file or the api_key credential, "
                "then reload (SIGHUP)")

    def _on_poll(self, outcome: stages.StageOutcome, now: float) -> None:
        answer = outcome.poll
        job_id = outcome.job_id
        if answer.verdict is PollVerdict.COMPLETED and answer.provider_seconds is not None:
            sample = answer.provider_seconds
            self._expected = sample if self._expected is None else 0.8 * self._expected + 0.2 * sample
        if answer.verdict in (PollVerdict.WAITING, PollVerdict.RETRY, PollVerdict.AUTH):
            delay_floor = answer.retry_after or 0.0
            self._next_poll[job_id] = max(now + delay_floor, next_poll_time(
                now, self._submitted_clock.get(job_id), self.poll_interval, self._expected))
        else:
            self._next_poll.pop(job_id, None)
            self._submitted_clock.pop(job_id, None)

    def take_new_files(self) -> None:
        """Settled files from the watcher become PENDING jobs with today's restore parameters."""
        if self.stop_requested:
            return
        journal = self.ctx.journal
        params = self.ctx.config.restore.as_request()
        for sighting in self.watcher.take_settled(journal.active_paths()):
            job = journal.add_job(sighting.rel_path, sighting.size, sighting.mtime_ns, params)
            if job is not None:
                log.info("file.detected", rel_path=job.rel_path, job_id=job.id, size=job.size,
                         settle_wait=round(sighting.waited, 3))

    def fail_overdue_jobs(self) -> None:
        now_wall = self.ctx.wall()
        for job in self.ctx.journal.jobs_in(JobState.SUBMITTED):
            if job.id in self._running or job.submitted_at is None:
                continue
            if now_wall - job.submitted_at > self.job_timeout:
                self._dispatch(job, "fail", lambda ctx, j: stages.fail(
                    ctx, j, "timeout", f"still {j.remote_status or 'unfinished'} after api.job_timeout "
                    f"({self.job_timeout:g} s)"))

    def start_submits(self) -> None:
        """Fill free slots with the oldest pending jobs whose backoff has passed."""
        if self.stop_requested:
            return
        journal = self.ctx.journal
        free = self.max_in_flight - journal.count_in(*IN_FLIGHT_STATES)
        if free <= 0:
            return
        now_wall = self.ctx.wall()
        ready = [job for job in journal.jobs_in(JobState.PENDING, limit=free + len(self._running))
                 if job.id not in self._running and job.not_before <= now_wall]
        allowed = self.gate.allowed(self.clock(), min(free, len(ready))) if ready else 0
        for job in ready[:allowed]:
            try:
                job = journal.transition(job, JobState.PUBLISHING, "slot taken")
            except StaleTransition:
                continue
            self._dispatch(job, "launch", stages.launch)

    def start_checks_ahead(self) -> None:
        """Preflight the next few pending files while the slots are busy (at most two at a time)."""
        if self.stop_requested:
            return
        checking = sum(r.kind == "check" for r in self._running.values())
        if checking >= CHECKS_AHEAD_AT_ONCE:
            return
        now_wall = self.ctx.wall()
        for job in self.ctx.journal.jobs_in(JobState.PENDING, limit=2 * self.max_in_flight):
            if checking >= CHECKS_AHEAD_AT_ONCE:
                return
            if (job.id in self._running or job.id in self.ctx.prechecked or job.sha256
                    or job.not_before > now_wall):
                continue
            self._dispatch(job, "check", stages.check_ahead)
            checking += 1

    def poll_now(self, job_id: int) -> None:
        """Thread-safe: poll this job on the next pass (the provider's webhook said it changed)."""
        self._poll_requests.put(job_id)
        self.wake.set()

    def start_polls(self) -> None:
        now = self.clock()
        submitted = {job.id: job for job in self.ctx.journal.jobs_in(JobState.SUBMITTED)}
        while True:
            try:
                job_id = self._poll_requests.get_nowait()
            except queue.Empty:
                break
            if job_id in submitted:
                self._next_poll[job_id] = now
        for job_id in [j for j in self._next_poll if j not in submitted]:  # timed out, failed, done
            self._next_poll.pop(job_id, None)
            self._submitted_clock.pop(job_id, None)
        for job in submitted.values():
            if job.id in self._running:
                continue
            due = self._next_poll.setdefault(job.id, now)
            if due <= now:
                self._dispatch(job, "poll", stages.poll)

    def start_finishing(self) -> None:
        """Jobs past the provider: download (after any backoff), archive, or move to failed/."""
        now_wall = self.ctx.wall()
        work = {JobState.DOWNLOADING: stages.deliver, JobState.DELIVERING: stages.finish_delivery,
                JobState.FAILING: stages.finish_failing}
        for job in self.ctx.journal.jobs_in(*work):
            if job.id not in self._running and job.not_before <= now_wall:
                self._dispatch(job, job.state.value, work[job.state])

    def heartbeat(self) -> None:
        now = self.clock()
        self.last_pass = now
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + 2.0
            self.ctx.journal.set_meta("heartbeat", repr(self.ctx.wall()))

    def sleep_until_due(self) -> None:
        now = self.clock()
        deadlines = [now + MAX_SLEEP, self.watcher.next_deadline()]
        deadlines += [t for j, t in self._next_poll.items() if j not in self._running]
        if self.gate.paused and not self.gate.probe_out and self.gate.until > now:
            deadlines.append(self.gate.until)
        timeout = min(deadlines) - now
        if timeout > 0:
            self.wake.wait(timeout)

    # ------------------------------------------------------------------ the pool

    def _dispatch(self, job: Job, kind: str, stage: Callable) -> None:
        future = self.pool.submit(self._run_stage, stage, job)
        running = _Running(job.id, kind, future)
        self._running[job.id] = running
        future.add_done_callback(lambda _f: (self._finished.put(running), self.wake.set()))

    def _run_stage(self, stage: Callable, job: Job) -> stages.StageOutcome:
        with structlog.contextvars.bound_contextvars(job_id=job.id, rel_path=job.rel_path):
            try:
                return stage(self.ctx, job) or stages.StageOutcome(job.id)
            except StaleTransition as exc:
                log.debug("job.stale", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not stop the daemon
                self._after_stage_error(job, exc)
            return stages.StageOutcome(job.id)

    def _after_stage_error(self, job: Job, exc: Exception) -> None:
        """An unexpected error (disk full, folder not writable): keep the job and retry it later."""
        current = self.ctx.journal.get(job.id)
        errors = self._stage_errors[job.id] = self._stage_errors.get(job.id, 0) + 1
        delay = stages.backoff_delay(errors, base=2.0, cap=120.0)
        log.error("job.stage_error", stage=job.state.value, error=f"{type(exc).__name__}: {exc}",
                  retry_in=round(delay, 1), exc_info=not isinstance(exc, OSError))
        if current is None or current.state in FINAL_STATES:
            return
        changes = {"not_before": self.ctx.wall() + delay, "last_error": f"{type(exc).__name__}: {exc}"}
        try:
            if current.state is JobState.PUBLISHING:
                self.ctx.journal.transition(current, JobState.PENDING, "error while publishing", **changes)
            elif current.state is JobState.SUBMITTING:
                stages.fail(self.ctx, current, "submit_ambiguous", f"unexpected error while submitting: {exc}")
            else:
                self.ctx.journal.update(current, **changes)
        except Exception as inner:  # noqa: BLE001 - e.g. the journal itself is unwritable; retried next pass
            log.error("journal.write_failed", error=f"{type(inner).__name__}: {inner}")
