"""What a restart does first, and a fleet's daemon whenever another's lease lapses: carry on every
job a run that is gone left mid-way.

The jobs are taken over in the journal first (`Journal.take_over`), then each goes on from its
state: PUBLISHING goes back to PENDING (published again later); SUBMITTING is the ambiguous window
and goes to failed/ with the reason, never resent; SUBMITTED is served again under the same key where
its checked copy is on this machine, and polling resumes (never a second submit); the later states
need nothing, the loop picks them up. At start, orphans of a crash are then swept from the host and
temporary files removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from .context import Context, staged_job_id, unpublish
from .finishing import fail
from .jobs import FINAL_STATES, Charge, Job, JobState
from .outbox import remove_temporaries
from .stages import RESEND_HINT

log = structlog.get_logger("daemon.recovery")

STALE_TEMPORARY_SECONDS = 6 * 3600.0
"""A temporary file in the shared folders untouched this long is a crash's leftover, not another
daemon's write in progress (a delivery writes its file in seconds)."""

UNFINISHED_STATES = tuple(state for state in JobState if state not in FINAL_STATES)


def recover(ctx: Context, progress: Callable[[], None] = lambda: None) -> None:
    """Put every job a previous run left mid-way back on a path that continues it.

    Each job on its own: one that cannot be recovered now (the inbox not mounted yet, a disk
    error) is logged and left where the loop picks it up, and never stops the others. `progress`
    is called after each job and each folder walked: a long recovery (a large archive on a slow
    share) is work being done, not a hung daemon, and systemd's watchdog must hear so.
    """
    journal = ctx.journal
    # One daemon on its own journal: whatever is held was held by its own previous run.
    for job in journal.take_over(everything=not journal.store.shared):
        carry_on(ctx, job, progress)
    swept = 0
    # Another live daemon's publications are not orphans, nor are its half-written files in the
    # shared folders: only a daemon alone (always, on SQLite) sweeps them all. Beside others, it
    # removes only temporary files no write has touched for a long while.
    alone = journal.alone()
    if alone:
        try:
            swept = ctx.host.sweep(journal.hosted_keys())
        except Exception as exc:  # noqa: BLE001 - orphans wait for the next start (and the lifecycle rule)
            log.warning("hosting.sweep_failed", error=f"{type(exc).__name__}: {exc}")
        progress()
    older_than = None if alone else ctx.wall() - STALE_TEMPORARY_SECONDS
    removed = sum(remove_temporaries(p, progress, older_than) for p in (ctx.folders.outbox, ctx.folders.archive,
                                                                         ctx.folders.failed))
    unpinned = _sweep_staging(ctx)
    if swept or removed or unpinned:
        log.info("recover.cleaned", orphans_unpublished=swept, temporary_files_removed=removed,
                 staged_copies_removed=unpinned)


def carry_on(ctx: Context, job: Job, progress: Callable[[], None] = lambda: None) -> None:
    """Put one job taken over from a run that is gone back on a path that continues it."""
    step = _STEPS.get(job.state)
    if step is not None:
        _recover_one(ctx, job, step, progress)


def _sweep_staging(ctx: Context) -> int:
    """Remove pinned copies and temporaries that no unfinished job needs (a crash's leftovers)."""
    try:
        names = os.listdir(ctx.staging)
    except FileNotFoundError:
        return 0
    unfinished = {job.id for job in ctx.journal.jobs_in(*UNFINISHED_STATES)}
    removed = 0
    for name in names:
        if staged_job_id(name) in unfinished and not name.endswith(".tmp"):
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (ctx.staging / name).unlink()
            removed += 1
    return removed


def _recover_one(ctx: Context, job: Job, step: Callable[[Context, Job], None], progress: Callable[[], None]) -> None:
    try:
        step(ctx, job)
    except Exception as exc:  # noqa: BLE001 - the loop's own steps carry the job on later
        log.warning("recover.job_error", rel_path=job.rel_path, job_id=job.id, state=job.state.value,
                    error=f"{type(exc).__name__}: {exc}")
    progress()


def _recover_publishing(ctx: Context, job: Job) -> None:
    unpublish(ctx, job)
    ctx.journal.transition(job, JobState.PENDING, "restart: publish again", hosted_key=None)


def _recover_submitting(ctx: Context, job: Job) -> None:
    ctx.journal.add_to_counter("ambiguous_at_restart")
    log.warning("job.ambiguous_at_restart", rel_path=job.rel_path, job_id=job.id)
    fail(ctx, job, "submit_ambiguous",
                "the daemon stopped while this file's submit was being sent; it is not resent "
                "automatically so it cannot be paid for twice. " + RESEND_HINT, charge=Charge.POSSIBLY_CHARGED)


def _recover_submitted(ctx: Context, job: Job) -> None:
    """The provider may not have fetched the scan yet: serve it again under the same key, if its
    checked copy is on this machine (a job taken over from another station's daemon is only polled)."""
    if job.hosted_key and job.upload_path and Path(job.upload_path).is_file():
        try:
            ctx.host.publish(job.hosted_key, Path(job.upload_path),
                                  "image/png" if job.hosted_key.endswith(".png") else "image/jpeg")
        except Exception as exc:  # noqa: BLE001 - a missing file only fails that job's fetch
            log.warning("file.republish_failed", rel_path=job.rel_path, job_id=job.id, error=str(exc))
    log.info("job.resumed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id)


_STEPS: dict[JobState, Callable[[Context, Job], None]] = {
    JobState.PUBLISHING: _recover_publishing,
    JobState.SUBMITTING: _recover_submitting,
    JobState.SUBMITTED: _recover_submitted,
}
"""What a job left in each state needs before the loop carries it on; the later states need nothing."""
