"""Sending failed files through the pipeline again (`codeformer-daemon retry`).

A retried file goes back into the inbox under its old name, and its job goes from FAILED back to
PENDING with its history kept, so `status` and the next error record tell the whole story. While
the daemon runs, it is the one that moves the files (the command leaves requests in the journal),
so no other process races its watcher; when it is not running, the command does the same itself
under the daemon's single-instance lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from .journal import Job, Journal, JobState
from .outbox import move_to, numbered

log = structlog.get_logger("daemon.retry")

FRESH_START = dict(sha256=None, upload_path=None, hosted_key=None, request_id=None, polling_url=None,
                   remote_status=None, media_url=None, output_path=None, output_sha256=None, final_path=None,
                   submit_attempts=0, download_attempts=0, not_before=0.0, last_error=None, error_kind=None,
                   submitted_at=None, finished_at=None, duplicate_of=None)
"""Columns a retried job starts again from: everything learnt on the failed run, except its history."""


POSSIBLY_PAID = frozenset({"submit_ambiguous", "timeout", "lost_at_provider"})
"""Failures after which the provider may have charged (and may still finish) the job: `--all`
leaves these out, and a person names each one after checking the provider's dashboard."""


class RetryError(Exception):
    """The files asked for cannot be retried; the message names each one and why."""


def error_record_path(path: Path) -> Path:
    return path.with_name(path.name + ".error.json")


def select_failed(journal: Journal, failed_dir: Path, targets: list[str],
                  everything: bool) -> tuple[list[Job], list[Job]]:
    """The failed jobs named by `targets` (files in failed/, or their .error.json), or all of them;
    and, for `everything`, those left out because they may already have been paid for.

    A name that is not a failed file this journal knows is an error for the whole call, so a typo
    never half-runs a batch.
    """
    retryable = {job.final_path: job for job in journal.jobs_in(JobState.FAILED)
                 if job.final_path and os.path.lexists(job.final_path)}
    if everything:
        jobs = sorted(retryable.values(), key=lambda job: job.id)
        return ([job for job in jobs if job.error_kind not in POSSIBLY_PAID],
                [job for job in jobs if job.error_kind in POSSIBLY_PAID])
    chosen: dict[int, Job] = {}
    unknown = []
    for target in targets:
        job = None
        for candidate in _candidates(target, failed_dir):
            job = retryable.get(str(candidate))
            if job is not None:
                break
        if job is None:
            unknown.append(target)
        else:
            chosen[job.id] = job
    if unknown:
        raise RetryError("not a failed file of this daemon (expected a file in " + str(failed_dir) + "): "
                         + ", ".join(unknown))
    return sorted(chosen.values(), key=lambda job: job.id), []


def _candidates(target: str, failed_dir: Path) -> list[Path]:
    """Where `target` may point: as given (from the current folder), or inside failed/."""
    if target.endswith(".error.json"):
        target = target[: -len(".error.json")]
    given = Path(target)
    found = [Path(os.path.abspath(given)), failed_dir / given]
    with contextlib.suppress(OSError):
        found.append(Path(os.path.realpath(given.parent)) / given.name)  # the folder reached another way
    return found


def requeue(journal: Journal, inbox: Path, job: Job) -> Job:
    """Move a failed file back into the inbox and its job back to PENDING; returns the new job.

    The file moves first: a crash between the two steps leaves it in the inbox with its job still
    FAILED, where it is simply new work. The other order could leave a PENDING job whose file is
    still in failed/, which would end as "vanished".
    """
    if job.state is not JobState.FAILED or not job.final_path or not os.path.lexists(job.final_path):
        raise RetryError(f"{job.rel_path}: no longer in failed/ (job #{job.id} is {job.state.value})")
    failed_file = Path(job.final_path)
    target = _free_inbox_name(journal, inbox, job.rel_path)
    move_to(failed_file, target)
    with contextlib.suppress(FileNotFoundError):
        error_record_path(failed_file).unlink()
    st = os.stat(target, follow_symlinks=False)
    rel_path = target.relative_to(inbox).as_posix()
    job = journal.transition(job, JobState.PENDING, f"retry requested: back in the inbox as {rel_path}",
                             rel_path=rel_path, size=st.st_size, mtime_ns=st.st_mtime_ns, **FRESH_START)
    log.info("job.retried", rel_path=rel_path, job_id=job.id)
    return job


def _free_inbox_name(journal: Journal, inbox: Path, rel_path: str) -> Path:
    """The file's old place in the inbox, or a numbered name if a new scan (or job) took it."""
    wanted = inbox / rel_path
    n = 0
    while os.path.lexists(numbered(wanted, n)) or journal.has_active_job(numbered(wanted, n).relative_to(inbox).as_posix()):
        n += 1
    return numbered(wanted, n)


def take_requests(journal: Journal, inbox: Path) -> int:
    """Carry out the retries `codeformer-daemon retry` asked the running daemon for; returns how many."""
    done = 0
    for job_id in journal.retry_requests():
        if not journal.take_retry_request(job_id):
            continue  # another daemon of the fleet took it first
        job = journal.get(job_id)
        try:
            if job is None:
                raise RetryError(f"job #{job_id} does not exist")
            requeue(journal, inbox, job)
            done += 1
        except (RetryError, OSError) as exc:  # e.g. the inbox is gone: the request is dropped, not retried forever
            log.warning("job.retry_refused", job_id=job_id, reason=str(exc))
    return done
