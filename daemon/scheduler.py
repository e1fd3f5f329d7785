"""The scheduler: one loop that decides what runs next, and a small pool that runs it.

Each pass of the loop is a list of named steps (take new files, submit, poll, finish, heartbeat). The
loop never blocks on the network: stages run on the worker pool and report back through a queue.
Every job in flight is polled on its own clock; no thread is parked per job. At most
`api.max_in_flight` jobs hold a slot, and a freed slot is refilled at once (pipelined, not batched).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from . import control, fleet, previews, recovery, stages
from .api import PollVerdict, SubmitVerdict
from .intake import Intake
from .jobs import FINAL_STATES, IN_FLIGHT_STATES, Charge, Job, JobState, StaleTransition
from .journal import StorageUnavailable, heartbeat_file
from .pacing import PollPlan, full_jitter, overdue_reason
from .pauses import Pauses
from .profiles import SETTINGS_META
from .watcher import InboxWatcher

log = structlog.get_logger("daemon.scheduler")

CHECKS_AHEAD_AT_ONCE = 2
"""Preflights run ahead of free slots at once; few, so submits and polls keep the workers they need."""

LOOP_ERROR_PAUSE = 2.0
"""Seconds to pause after a pass failed as a whole, so a persistent fault does not spin."""

RECOVERY_STEP_SECONDS = 600.0
"""How long one step of the start-up recovery may take (a republish to a slow bucket, an orphan
sweep) before the watchdog takes the daemon for hung."""

MAX_SLEEP = 2.0
"""The loop's longest nap when nothing is due (the watcher's health check, every two seconds, comes
as often). Signals wake it at once (`wake_on_signals`), and everything else that makes work (a file
event, a finished stage, a webhook) sets `wake`: this only bounds how stale the loop may look to
the systemd watchdog."""


FINISHING_PER_PASS = 64
"""Downloads, deliveries and failures started per pass (each is one pool task)."""

PREVIEW_SWEEP_SECONDS = 3600.0
"""How often previews older than dashboard.retention_days are looked for (also once at start)."""

RESULTS_WAITING_AT_MOST = 2
"""Submits wait while this many times `api.max_in_flight` finished results wait for their delivery:
a fast provider must not run ahead of a slow station until its result links expire."""

DOWNLOADS_AT_ONCE = max(2, os.cpu_count() or 2)
"""Deliveries (download, decode, guard, encode) running at once: their image work is CPU-bound, so
more than the cores would not finish sooner, only hold more images in memory (the decode budget
bounds the large ones). They run apart from the polls and submits, which never wait behind them."""

HEARTBEAT_SECONDS = 2.0

RETRY_CHECK_SECONDS = 1.0
"""How often the loop looks for `codeformer-daemon retry` requests (written by another process)."""

BACKING_OFF_STATES = (JobState.PENDING, JobState.DOWNLOADING, JobState.DELIVERING, JobState.FAILING)
"""States whose jobs wait out a backoff (`not_before`); the loop wakes when the first one ends."""

def wake_on_signals(wake: threading.Event) -> None:
    """Set `wake` the moment a signal arrives (call from the main thread, after the handlers).

    A Python signal handler may only set flags (an Event's lock could be held by the very thread it
    interrupts), and it cannot end the loop's wait early. The interpreter's wakeup file descriptor is
    written by the C-level handler at once; a small thread blocked on it sets `wake`. By the time the
    loop runs again the Python handler has run too, so the loop sees its flag. No polling: the
    thread sleeps until a signal comes.
    """
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(read_end, True)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def relay() -> None:
        while os.read(read_end, 64):
            wake.set()

    threading.Thread(target=relay, name="signal-wakeup", daemon=True).start()


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
        self.pauses = Pauses(ctx, clock, self.wake)
        """Why submits wait (the provider's refusals, the fleet's, a person's pause, a budget limit)."""
        self.gate = self.pauses.gate
        self.spending = self.pauses.spending
        self.fleet = self.pauses.fleet
        self.reload_hook: Callable[[], None] = lambda: None
        """Re-reads what can change without a restart (configuration, key); set by the service, run on SIGHUP."""
        self.status_hook: Callable[[str], None] | None = None
        """Shows `activity()` to a supervisor (systemd's STATUS=); None: nobody to show it to."""
        """Hears `activity()` every heartbeat (the service tells systemd); it must not block."""
        self._reload_requested = False
        self._finished: queue.SimpleQueue[_Running] = queue.SimpleQueue()
        self._running: dict[int, _Running] = {}
        self.polls = PollPlan(self.poll_interval, self.job_timeout)
        """When each job in flight is polled next, and what its polls have heard."""
        self._next_retry_check = 0.0
        self._next_heartbeat = 0.0
        self._stage_errors: dict[int, int] = {}
        self.last_pass = clock()
        self.recovering = False
        """True while the start-up recovery runs (see `is_alive`)."""
        ctx.notify = self.wake.set
        ctx.stopping = lambda: self.stop_requested
        ctx.poll_now = self.poll_now
        ctx.metrics.follow_in_flight_limit(lambda: self.gate.limit)
        self._poll_requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.intake = Intake(ctx, watcher, clock)
        """New files and retried ones into the journal, with the inbox's health for `status`."""
        self.outage = fleet.Outage(clock)
        """Whether the journal's database can be reached, said once when that changes."""

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Recover what a previous run left, then loop until `stop()`; clean-up in `finally`."""
        self.ctx.journal.start_heartbeat(heartbeat_file(self.ctx.config.state_dir))
        self.spending.record(self.ctx.config.budget)
        if self.ctx.journal.alone():  # a pause left by daemons that stopped together is not this one's
            self.pauses.record()
        self.recovering = True
        try:
            recovery.recover(self.ctx, progress=self._recovery_progress)
        except Exception as exc:  # noqa: BLE001 - e.g. failed/ not writable: the loop retries those jobs
            log.error("recover.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        finally:
            self.recovering = False
        self.last_pass = self.clock()  # recovery may have been long; the loop starts now
        try:
            while not self.stop_requested:
                self.wake.clear()  # before the pass: a wake-up during it makes the next nap return at once
                try:
                    self.collect_finished()
                    self.watch_inbox()
                    self.reload_if_requested()
                    self.take_retry_requests()
                    self.take_new_files()
                    self.fail_overdue_jobs()
                    self.start_submits()
                    self.start_checks_ahead()
                    self.start_polls()
                    self.start_finishing()
                    self.heartbeat()
                    self._after_outage()
                except StorageUnavailable as exc:  # the fleet's database is down: files wait, nothing is lost
                    self.outage.began(exc)
                    self.last_pass = self.clock()
                    self.wake.wait(LOOP_ERROR_PAUSE)
                except Exception as exc:  # noqa: BLE001 - e.g. the state disk is full: wait, then go on
                    log.error("loop.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
                    self.last_pass = self.clock()  # still a live loop: a full disk is no reason for a restart
                    self.wake.wait(LOOP_ERROR_PAUSE)
                self.sleep_until_due()
        finally:
            try:
                self.ctx.journal.note_inbox(None)  # this run's own word: `status` must not show a stale fact
                if self.ctx.journal.alone():  # else the fleet's pause and settings problems hold on without it
                    self.ctx.journal.set_meta(control.DAEMON_PAUSE_META, None)
                    self.ctx.journal.set_meta(SETTINGS_META, None)
            except StorageUnavailable:
                pass  # nothing to tidy in a database that cannot be reached

    def _recovery_progress(self) -> None:
        """Recovery is moving: count it as a pass, so the watchdog keeps being fed through a long one,
        and keep this daemon's lease (a long recovery must not hand its jobs to the others)."""
        self.last_pass = self.clock()
        if self.fleet is not None:
            self.fleet.renew_if_due(self.last_pass)

    def is_alive(self, stale_after: float) -> bool:
        """For the watchdog: the loop passed within `stale_after` seconds, or recovery made progress
        within RECOVERY_STEP_SECONDS (one of its steps may wait out network timeouts and retries)."""
        allowed = RECOVERY_STEP_SECONDS if self.recovering else stale_after
        return self.clock() - self.last_pass <= allowed

    def request_stop(self) -> None:
        """Only sets a flag, so it is safe in a signal handler; the loop sees it within one pass."""
        self.stop_requested = True

    def request_reload(self) -> None:
        """Only sets a flag (safe in a SIGHUP handler); the loop reloads at its next pass."""
        self._reload_requested = True

    def reload_if_requested(self) -> None:
        if not self._reload_requested:
            return
        self._reload_requested = False
        self.reload_hook()
        self.gate.reload(self.clock())
        self.spending.record(self.ctx.config.budget)  # a changed limit applies at this pass's submits

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
        self.ctx.metrics.submit_answered(answer.verdict)
        if answer.verdict is SubmitVerdict.ACCEPTED:
            sent_at = outcome.sent_at if outcome.sent_at is not None else now
            self.polls.submitted(outcome.job_id, sent_at, now, webhook=outcome.webhook)
        self.pauses.heard_submit(answer, now, outcome.sent_at)

    def _after_outage(self) -> None:
        """The journal answers (again): jobs whose stage could not record its outcome go on as after a
        restart, and the inbox is scanned again for files that settled meanwhile."""
        left = self.outage.ended()
        if left is None:
            return
        self.watcher.request_rescan()
        for job_id in left:
            job = self.ctx.journal.get(job_id)
            if job is not None and job.id not in self._running and self.ctx.journal.holds(job) \
                    and job.state in (JobState.PUBLISHING, JobState.SUBMITTING):
                self._dispatch(job, "recover", recovery.carry_on)

    def _on_poll(self, outcome: stages.StageOutcome, now: float) -> None:
        answer = outcome.poll
        self.ctx.metrics.poll_answered(answer.verdict)
        if answer.verdict is PollVerdict.AUTH:
            self.pauses.heard_poll_rejecting_the_key(answer, now)
        elif answer.http_status == 200:
            self.pauses.heard_poll_accepting_the_key()
        if self.polls.heard(outcome.job_id, answer, now, self.ctx.wall()):
            log.warning("webhook.not_arriving", job_id=outcome.job_id,
                        detail="a job finished without its webhook call (is hosting.builtin.public_url reachable "
                               "from the provider?); polling every job at api.poll_interval until a call arrives")

    def watch_inbox(self) -> None:
        """Keep the watcher watching and the inbox's state recorded; when the inbox is back, the jobs
        that waited for it go on at once."""
        if self.intake.watch_inbox():
            self._retry_jobs_held_by_the_inbox()

    def _retry_jobs_held_by_the_inbox(self) -> None:
        """The inbox is back: jobs that waited for it go on now rather than after their backoff."""
        now_wall = self.ctx.wall()
        for job in self.ctx.journal.jobs_in(JobState.PENDING, JobState.DELIVERING, JobState.FAILING):
            # A failing job keeps its own reason in last_error, so any backoff of one is let go.
            held = job.state is JobState.FAILING or (job.last_error or "").startswith(stages.InboxUnavailable.__name__)
            if held and job.id not in self._running and job.not_before > now_wall:
                self._stage_errors.pop(job.id, None)
                try:
                    self.ctx.journal.update(job, not_before=now_wall)
                except StaleTransition:
                    pass  # a stage moved it meanwhile: it is going on anyway

    def take_retry_requests(self) -> None:
        """Once a second: failed files that `codeformer-daemon retry` asked for go back into the inbox
        as pending jobs, and a person's pause, or the fleet's, takes effect (all asked for from other
        processes). Done before `take_new_files`, so the watcher never sees a returned file without its job.
        """
        now = self.clock()
        if now < self._next_retry_check:
            return
        self._next_retry_check = now + RETRY_CHECK_SECONDS
        self.pauses.follow_person()
        self.pauses.follow_fleet()
        if not self.stop_requested:
            self.intake.take_retry_requests()

    def take_new_files(self) -> None:
        """Settled files from the watcher become PENDING jobs (see `Intake.take_new_files`)."""
        if not self.stop_requested:
            self.intake.take_new_files()

    def fail_overdue_jobs(self) -> None:
        """Jobs the provider has held, or not answered for usably, longer than api.job_timeout go to failed/.

        Only on the provider's own word (see `pacing.overdue_reason`). After a restart, an outage or
        a rejected key it is the daemon that could not ask, and the job may well be finished and
        paid for: it is polled first.
        """
        # A verdict changes only with what a poll heard: only the jobs polled since are looked at.
        for job_id, evidence in self.polls.take_heard().items():
            if job_id in self._running:
                self.polls.hear_again(job_id)  # looked at once its stage is back
                continue
            job = self.ctx.journal.get(job_id)
            if job is None or job.state is not JobState.SUBMITTED or job.submitted_at is None:
                continue
            verdict = overdue_reason(job.submitted_at, evidence, self.job_timeout, job.remote_status)
            if verdict is not None:
                kind, reason = verdict
                self._dispatch(job, "fail", lambda ctx, j, kind=kind, reason=reason: stages.fail(ctx, j, kind, reason))

    def start_submits(self) -> None:
        """Fill free slots with the oldest pending jobs whose backoff has passed."""
        if not self.watcher.available:  # their files cannot be read: they wait, nothing is dropped
            return
        if self.pauses.by_person:
            return
        if self.stop_requested:
            return
        budget_allows = self.spending.allowance(self.ctx.config.budget)
        if budget_allows == 0:  # like an empty wallet: files wait in the inbox, jobs at the provider finish
            return
        journal = self.ctx.journal
        free = self.gate.limit - journal.count_in(*IN_FLIGHT_STATES)
        if budget_allows is not None:
            free = min(free, budget_allows)
        if free <= 0:
            return
        if journal.count_in(JobState.DOWNLOADING) >= RESULTS_WAITING_AT_MOST * self.max_in_flight:
            return  # this station delivers slower than the provider restores: let it catch up first
        # Readiness is decided in SQL: the oldest jobs backing off must not hide newer ones that are ready.
        now_wall, running = self.ctx.wall(), list(self._running)
        ready = journal.next_pending(limit=free, due_by=now_wall, exclude=running)
        if ready:  # another station's 402 of a moment ago holds this one too
            self.pauses.follow_fleet()
        allowed = self.gate.allowed(self.clock(), min(free, len(ready))) if ready else 0
        launched = 0
        try:
            # The claim counts the slots again, every daemon's, in the transaction that takes them.
            for job in journal.claim(allowed, in_flight_limit=self.gate.limit, due_by=now_wall, exclude=running,
                                     spending_caps=self.spending.caps(self.ctx.config.budget)):
                self._dispatch(job, "launch", stages.launch)
                launched += 1
        finally:
            if allowed and not launched:  # a probe handed out but never sent must not keep the gate shut
                self.gate.launch_ended_without_submit()

    def start_checks_ahead(self) -> None:
        """Preflight the next few pending files while the slots are busy (at most two at a time)."""
        if not self.watcher.available:
            return
        if self.stop_requested:
            return
        checking = sum(r.kind == "check" for r in self._running.values())
        if checking >= CHECKS_AHEAD_AT_ONCE:
            return
        # The next few that are due (backing-off jobs must not hide them); those checked already count
        # toward the few, so pinned copies made ahead stay bounded. Ids first: a whole row is read
        # only for a job that is checked now.
        for job_id, checked in self.ctx.journal.next_pending(limit=2 * self.max_in_flight, due_by=self.ctx.wall(),
                                                            exclude=list(self._running)):
            if checking >= CHECKS_AHEAD_AT_ONCE:
                return
            if checked or job_id in self.ctx.prechecked:
                continue
            job = self.ctx.journal.get(job_id)
            if job is None or job.state is not JobState.PENDING:
                continue
            self._dispatch(job, "check", stages.check_ahead)
            checking += 1

    def poll_now(self, job_id: int) -> None:
        """Thread-safe: poll this job on the next pass (the provider's webhook said it changed)."""
        self._poll_requests.put(job_id)
        self.wake.set()

    def start_polls(self) -> None:
        now = self.clock()
        submitted = set(self.ctx.journal.ids_in(JobState.SUBMITTED))  # rows are read only for the polls due
        while True:
            try:
                job_id = self._poll_requests.get_nowait()
            except queue.Empty:
                break
            if job_id in submitted and self.polls.called_back(job_id, now):
                log.info("webhook.arriving", job_id=job_id, detail="webhook calls arrive again: polls are a safety net")
        self.polls.keep_only(submitted | self._running.keys())  # a running poll reports back after its job moved on
        for job_id in self.polls.due([j for j in submitted if j not in self._running], now):
            job = self.ctx.journal.get(job_id)
            if job is not None and job.state is JobState.SUBMITTED:
                self._dispatch(job, "poll", stages.poll)

    def start_finishing(self) -> None:
        """Jobs past the provider: download (after any backoff), archive, or move to failed/.

        Downloads run at most DOWNLOADS_AT_ONCE at a time; archiving and failing are quick file moves.
        """
        now_wall, running = self.ctx.wall(), list(self._running)
        downloading = sum(r.kind == JobState.DOWNLOADING.value for r in self._running.values())
        free = DOWNLOADS_AT_ONCE - downloading
        jobs = self.ctx.journal.jobs_in(JobState.DOWNLOADING, limit=free, due_by=now_wall,
                                        exclude=running) if free > 0 else []
        for state in (JobState.DELIVERING, JobState.FAILING):  # one state a query: an index walk, no sort
            jobs += self.ctx.journal.jobs_in(state, limit=FINISHING_PER_PASS, due_by=now_wall, exclude=running)
        work = {JobState.DOWNLOADING: stages.deliver, JobState.DELIVERING: stages.finish_delivery,
                JobState.FAILING: stages.finish_failing}
        for job in jobs:
            self._dispatch(job, job.state.value, work[job.state])

    def heartbeat(self) -> None:
        """Show the daemon is alive (for `status` and the watchdog), and remind, at a bounded rate, of a pause."""
        now = self.clock()
        self.last_pass = now
        if self.fleet is not None:  # on its own clock: a few times per lease, however short
            self.fleet.renew_if_due(now)
            for job in self.fleet.take_over_if_due(now, self.outage.ended_at):
                self._dispatch(job, "takeover", recovery.carry_on)
        self.pauses.remind_if_due(now)
        if now >= self._next_preview_sweep:
            self._next_preview_sweep = now + PREVIEW_SWEEP_SECONDS
            self._sweep_previews()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_SECONDS
            self.ctx.journal.beat()  # a touched file, never a synced write: idle costs the disk nothing
            if self.status_hook is not None:  # two counts every two seconds are not worth making for nobody
                self.status_hook(self.activity())

    _next_preview_sweep = 0.0
    _preview_sweeper: threading.Thread | None = None

    def _sweep_previews(self) -> None:
        """Remove the dashboard's previews of jobs finished more than retention_days ago, on a thread
        of its own (a large folder on an SD card takes a while to list); one sweep at a time."""
        folder = previews.enabled_folder(self.ctx.config)
        if folder is None or (self._preview_sweeper is not None and self._preview_sweeper.is_alive()):
            return
        cutoff = self.ctx.wall() - self.ctx.config.dashboard.retention_days * 86400
        journal = self.ctx.journal

        def finished(job_id: int) -> bool:  # or gone from the journal
            job = journal.get(job_id)
            return job is None or job.state in FINAL_STATES

        def sweep() -> None:
            try:
                removed = previews.sweep_previews(folder, finished, cutoff)
            except Exception as exc:  # noqa: BLE001 - previews are disposable: say so and go on
                log.warning("preview.sweep_failed", error=f"{type(exc).__name__}: {exc}")
                return
            if removed:
                log.info("preview.swept", removed=removed)

        self._preview_sweeper = threading.Thread(target=sweep, name="preview-sweep", daemon=True)
        self._preview_sweeper.start()

    def activity(self) -> str:
        """What the daemon is doing, in one line: "3 in flight, 12 queued, paused: insufficient balance"."""
        journal = self.ctx.journal
        parts = [f"{journal.count_in(*IN_FLIGHT_STATES)} in flight", f"{journal.count_in(JobState.PENDING)} queued"]
        if self.pauses.by_person:
            parts.append(f"paused: {control.PAUSED_BY_PERSON}")
        elif self.pauses.reason:
            parts.append(f"paused: {self.pauses.reason}")
        if self.watcher.unavailable_reason:
            parts.append(f"inbox unavailable: {self.watcher.unavailable_reason}")
        return ", ".join(parts)

    def sleep_until_due(self) -> None:
        now = self.clock()
        deadlines = [now + MAX_SLEEP, self.watcher.next_deadline()]
        next_poll = self.polls.next_time(self._running.keys())
        if next_poll is not None:
            deadlines.append(next_poll)
        gate_opens = self.gate.wake_at(now)
        if gate_opens is not None:
            deadlines.append(gate_opens)
        wall = self.ctx.wall()
        try:
            backoff_ends = self.ctx.journal.next_due(BACKING_OFF_STATES, wall)
        except StorageUnavailable:  # outside the pass's try: the next pass says so, once; MAX_SLEEP bounds the nap
            backoff_ends = None
        if backoff_ends is not None:
            deadlines.append(now + (backoff_ends - wall))
        if self.spending.resumes_at is not None:  # a new day or month lifts the limit: wake right then
            deadlines.append(now + (self.spending.resumes_at - wall))
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
            except StorageUnavailable:  # said once by the loop; the job is looked at again when it is back
                self.outage.left_behind(job.id)
            except Exception as exc:  # noqa: BLE001 - one job's trouble must not stop the daemon
                try:
                    self._after_stage_error(job, exc)
                except Exception as inner:  # noqa: BLE001 - e.g. the journal unreadable: the loop goes on
                    log.error("journal.write_failed", error=f"{type(inner).__name__}: {inner}")
            return stages.StageOutcome(job.id)

    def _after_stage_error(self, job: Job, exc: Exception) -> None:
        """An unexpected error (disk full, folder not writable): keep the job and retry it later."""
        current = self.ctx.journal.get(job.id)
        errors = self._stage_errors[job.id] = self._stage_errors.get(job.id, 0) + 1
        delay = full_jitter(errors, base=2.0, cap=120.0)
        if isinstance(exc, stages.InboxUnavailable):  # one watch.inbox_unavailable error says it for all
            log.info("job.waiting_for_inbox", stage=job.state.value, retry_in=round(delay, 1))
        else:
            log.error("job.stage_error", stage=job.state.value, error=f"{type(exc).__name__}: {exc}",
                      retry_in=round(delay, 1), exc_info=not isinstance(exc, OSError))
        if current is None or current.state in FINAL_STATES:
            return
        changes = {"not_before": self.ctx.wall() + delay}
        if current.state is not JobState.FAILING:  # a failing job keeps the reason it fails for
            changes["last_error"] = f"{type(exc).__name__}: {exc}"
        try:
            if current.state is JobState.PUBLISHING:
                stages.unpublish(self.ctx, current)  # its file may be out there already: never leave it served
                self.ctx.journal.transition(current, JobState.PENDING, "error while publishing", hosted_key=None,
                                            **changes)
            elif current.state is JobState.SUBMITTING:
                stages.fail(self.ctx, current, "submit_ambiguous", f"unexpected error while submitting: {exc}",
                            charge=Charge.POSSIBLY_CHARGED)
            else:
                self.ctx.journal.update(current, **changes)
        except StaleTransition:
            pass  # moved meanwhile (in a fleet: taken over by another daemon): not this daemon's to retry
        except Exception as inner:  # noqa: BLE001 - e.g. the journal itself is unwritable; retried next pass
            log.error("journal.write_failed", error=f"{type(inner).__name__}: {inner}")
