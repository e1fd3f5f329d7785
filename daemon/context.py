"""What every stage works in, and the small facts about a job's files that stages share.

`Context` is built once by the service and handed to each stage; `StageOutcome` is what a stage
hands back to the scheduler. The helpers here answer questions every stage asks: has the scan
changed since it was taken, is the inbox itself there, and what to undo when a job lets go of its
published and staged copies.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .api import ApiClient, PollAnswer, SubmitAnswer
from .config import Config
from .hosting import HostingAdapter, HostingError, key_for_logs
from .journal import Job, Journal
from .metrics import Metrics
from .outbox import Folders
from .preflight import PreflightResult
from .watcher import probe_inbox

log = structlog.get_logger("daemon.stages")


@dataclass
class Context:
    """What the stages need; built once by the service."""

    config: Config
    journal: Journal
    host: HostingAdapter
    api: ApiClient
    folders: Folders
    inbox: Path
    staging: Path
    notify: Callable[[], None] = lambda: None
    """Wakes the scheduler, e.g. the moment a job frees its in-flight slot."""
    wall: Callable[[], float] = time.time
    stopping: Callable[[], bool] = lambda: False
    """True once a stop was requested: no new submit is started after that."""
    poll_now: Callable[[int], None] = lambda job_id: None
    """Asks the scheduler to poll a job at once (the provider's webhook said it changed)."""
    watched_inbox: tuple[int, int] | None = None
    """(device, inode) of the inbox folder the watcher watches, kept current by the scheduler."""
    inbox_unavailable: str | None = None
    """Why this daemon's watcher cannot read the inbox, None while it can; kept current by the scheduler.
    It is this station's own: in a fleet, another station's dropped share holds nothing here."""
    c2pa_key: Path | None = None
    """The PEM key that signs outputs (output.c2pa), resolved by the service; None: no signing."""
    started_at: float = field(default_factory=time.time)
    """Wall time this daemon started: jobs submitted before it lived through a restart."""
    prechecked: dict[int, tuple[PreflightResult, int, int]] = field(default_factory=dict)
    """Preflight results of pending jobs, checked ahead of their slot: (result, size, mtime_ns)."""
    metrics: Metrics = field(default_factory=Metrics)
    """Counters the stages bump (the service gives one that also reads its journal at each scrape)."""


def size_and_mtime(path: Path) -> tuple[int | None, int | None]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None, None
    return st.st_size, st.st_mtime_ns


def changed_since_taken(source: Path, job: Job) -> bool:
    """True when the file in the inbox is no longer the content this job recorded (gone is not changed)."""
    stat_key = size_and_mtime(source)
    return stat_key != (None, None) and stat_key != (job.size, job.mtime_ns)


@dataclass(frozen=True)
class StageOutcome:
    """What the scheduler needs to hear back from a stage (gating and poll timing)."""

    job_id: int
    submit: SubmitAnswer | None = None
    poll: PollAnswer | None = None
    sent_at: float | None = None
    """time.monotonic() when the submit left: the start of the provider's clock for this job."""
    webhook: bool = False
    """The submit asked the provider to call back when the job finishes (polls are then a safety net)."""


def unpublish(ctx: Context, job: Job) -> None:
    if job.hosted_key:
        ctx.host.close_callback(job.hosted_key)
        try:
            ctx.host.unpublish(job.hosted_key)
        except HostingError as exc:
            log.warning("file.unpublish_failed", rel_path=job.rel_path, job_id=job.id,
                        key=key_for_logs(job.hosted_key), error=str(exc))
            return
        log.debug("file.unpublished", rel_path=job.rel_path, job_id=job.id, key=key_for_logs(job.hosted_key))


def remove_staged(ctx: Context, job: Job) -> None:
    """Remove this job's pinned copy and any PNG made from it (the job no longer needs them)."""
    for path in staged_files(ctx.staging, job.id):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def staged_files(staging: Path, job_id: int) -> list[Path]:
    """The files preflight made for one job: the pin `job-<id>-<name>` and the PNG `job-<id>.png`."""
    try:
        names = os.listdir(staging)
    except FileNotFoundError:
        return []
    return [staging / n for n in names if staged_job_id(n) == job_id]


def pinned_original(ctx: Context, job: Job) -> Path | None:
    """The scan as it was checked and sent: its pin in staging (kept beside a PNG made from it), or,
    for a job recorded before pins, the inbox file if it is unchanged; None when neither is there."""
    if job.upload_path and Path(job.upload_path).parent == ctx.staging:
        pins = [p for p in staged_files(ctx.staging, job.id) if p.name.startswith(staged_stem(job.id) + "-")]
        if pins:
            return pins[0]
    source = ctx.inbox / job.rel_path
    if os.path.isfile(source) and not os.path.islink(source) and not changed_since_taken(source, job):
        return source
    return None


def staged_stem(job_id: int) -> str:
    """How the files preflight stages for a job begin: `job-<id>-<name>` (the pin), `job-<id>.png`."""
    return f"job-{job_id}"


def staged_job_id(name: str) -> int | None:
    """The job a staging file belongs to, from its name (see `staged_stem`); None for anything else."""
    head = name.split(".", 1)[0].split("-", 2)
    if len(head) >= 2 and head[0] == "job" and head[1].isdigit():
        return int(head[1])
    return None


class InboxUnavailable(OSError):
    """The inbox folder itself is missing or unreadable: an environment fault, not a vanished file."""


def require_inbox(ctx: Context) -> None:
    """Raise InboxUnavailable when a job's source is missing because the whole inbox is.

    A share unmounted or a disk pulled is no reason to drop the job or skip its archiving: raised
    from a stage, the scheduler keeps the job and retries it later. The watcher's verdict (recorded
    by the scheduler) also covers an unmounted share whose empty mount point still looks like a folder,
    and so, before the watcher has noticed, does comparing the folder with the one it watches: an
    unmounted share leaves the mount point, another folder, in its place.
    """
    identity, reason = probe_inbox(ctx.inbox)
    reason = ctx.inbox_unavailable or reason
    if reason is None and ctx.watched_inbox is not None and identity != ctx.watched_inbox:
        reason = "the folder at its path is not the one being watched (a share unmounted?)"
    if reason is not None:
        raise InboxUnavailable(f"the inbox is unavailable ({reason}); the job waits for it")
