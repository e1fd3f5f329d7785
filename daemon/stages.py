"""The stages one job goes through, run on the worker pool: launch, poll, deliver, fail.

Each stage does blocking I/O and records its outcome in the journal before the next side effect,
so that any of them can be cut short by a crash and simply run again. The scheduler decides *when*
a stage runs; a stage decides only what its own answer means for its job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import structlog
from PIL import Image, UnidentifiedImageError

from .api import (ApiClient, DownloadError, PollAnswer, PollVerdict, SubmitAnswer, SubmitVerdict,
                  choose_polling_url)
from .config import Config
from .hosting import HostingAdapter, HostingError, key_for_logs, new_key
from .journal import Job, Journal, JobState, StaleTransition
from .logging import mask_secrets
from .outbox import Folders, claim_name, finish_temp, free_name, move_to, temporary_file, write_json_atomically
from .pacing import full_jitter
from .preflight import PreflightError, PreflightResult, check_image
from .watcher import probe_inbox

log = structlog.get_logger("daemon.stages")

RESEND_HINT = ("If the provider's dashboard shows no job for it, `codeformer-daemon retry` sends it "
               "again.")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


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
    prechecked: dict[int, tuple[PreflightResult, int, int]] = field(default_factory=dict)
    """Preflight results of pending jobs, checked ahead of their slot: (result, size, mtime_ns)."""


@dataclass(frozen=True)
class StageOutcome:
    """What the scheduler needs to hear back from a stage (gating and poll timing)."""

    job_id: int
    submit: SubmitAnswer | None = None
    poll: PollAnswer | None = None
    sent_at: float | None = None
    """time.monotonic() when the submit left: the start of the provider's clock for this job."""


# --------------------------------------------------------------------------- launch


def launch(ctx: Context, job: Job) -> StageOutcome:
    """PUBLISHING -> preflight, publish, submit -> SUBMITTED (or back to PENDING, or FAILING).

    Identical content with identical parameters is never paid for twice: a job whose twin is done
    reuses its result, and one whose twin is still in flight waits for it.
    """
    source = ctx.inbox / job.rel_path
    if job.output_path and Path(job.output_path).exists():  # a reused result placed before a crash
        finish_delivery(ctx, ctx.journal.transition(job, JobState.DELIVERING, "reused result already in place"))
        return StageOutcome(job.id)
    if not os.path.lexists(source):
        _require_inbox(ctx)
        ctx.journal.transition(job, JobState.VANISHED, "left the inbox before it was sent")
        log.info("file.vanished", rel_path=job.rel_path, job_id=job.id)
        return StageOutcome(job.id)
    if job.sha256 and not changed_since_taken(source, job):  # cheap re-check while waiting for a twin
        twin = ctx.journal.find_twin(job)
        if twin is not None and twin.state is not JobState.DONE:
            return _wait_for_twin(ctx, job, twin)
    stat_key = _stat_key(source)
    checked, *checked_stat_key = ctx.prechecked.pop(job.id, (None, None, None))
    if checked is None or stat_key != tuple(checked_stat_key) or not checked.upload_path.exists():
        checked = _preflight(ctx, job, source)
        if checked is None:
            return StageOutcome(job.id)
        stat_key = _stat_key(source)  # after the hash: what the recorded content belongs to
    size, mtime_ns = stat_key
    job = ctx.journal.update(job, sha256=checked.sha256, size=size, mtime_ns=mtime_ns,
                             upload_path=str(checked.upload_path))
    twin = ctx.journal.find_twin(job)  # an early look; enter_submitting below is the real guard
    if twin is not None:
        if _reuse_result(ctx, job, twin):
            return StageOutcome(job.id)
        if twin.state is not JobState.DONE:
            return _wait_for_twin(ctx, job, twin)
        log.info("job.duplicate_result_gone", rel_path=job.rel_path, job_id=job.id, twin=twin.id,
                 reason="the earlier output and media URL are gone; submitting again")
    key = new_key(".png" if checked.content_type == "image/png" else ".jpg")
    job = ctx.journal.update(job, hosted_key=key)  # recorded before publishing: no object the journal misses
    try:
        url = ctx.host.publish(key, checked.upload_path, checked.content_type)
    except HostingError as exc:
        return _back_to_pending(ctx, job, f"publish failed: {exc}", count_attempt=True)
    log.info("file.published", rel_path=job.rel_path, job_id=job.id, adapter=ctx.host.name,
             key=key_for_logs(key), bytes=checked.upload_path.stat().st_size)

    webhook = None
    if ctx.config.hosting.builtin.webhook:
        job_id = job.id
        webhook = ctx.host.open_callback(key.split(".")[0], lambda: ctx.poll_now(job_id))
    if ctx.stopping():  # asked to stop while publishing: do not start a submit now
        return _back_to_pending(ctx, job, "stopping: not submitted", count_attempt=False, retry_after=0, quiet=True)
    submitting, twin = ctx.journal.enter_submitting(job, "submit about to be sent")
    if twin is not None:  # an identical job got there first, after this one had looked
        return _wait_for_twin(ctx, job, twin)
    job = submitting
    sent_at = time.monotonic()
    answer = ctx.api.submit(url, job.params, webhook_url=webhook)
    took = round(time.monotonic() - sent_at, 3)
    return StageOutcome(job.id, submit=_record_submit(ctx, job, answer, took), sent_at=sent_at)


def check_ahead(ctx: Context, job: Job) -> StageOutcome:
    """PENDING: preflight a file before its slot frees, so a freed slot only publishes and submits.

    Bad files fail here at once, even while every slot is busy. The result is kept in memory
    with the file's size and mtime; `launch` checks again if either changed (or after a restart).
    """
    source = ctx.inbox / job.rel_path
    checked = _preflight(ctx, job, source)
    if checked is not None:
        size, mtime_ns = _stat_key(source)
        ctx.prechecked[job.id] = (checked, size, mtime_ns)
    return StageOutcome(job.id)


def _preflight(ctx: Context, job: Job, source: Path) -> PreflightResult | None:
    """Run preflight; on a bad file fail the job (or mark it vanished) and return None."""
    if not os.path.lexists(source):
        _require_inbox(ctx)
        ctx.journal.transition(job, JobState.VANISHED, "left the inbox before it was sent")
        log.info("file.vanished", rel_path=job.rel_path, job_id=job.id)
        return None
    try:
        checked = check_image(source, ctx.staging, f"job-{job.id}", max_pixels=ctx.config.preflight.max_pixels)
    except PreflightError as exc:
        if not os.path.lexists(source):
            _require_inbox(ctx)
            ctx.journal.transition(job, JobState.VANISHED, "left the inbox during preflight")
            return None
        fail(ctx, job, "preflight", exc.reason)
        return None
    if checked.converted:
        log.info("file.converted", rel_path=job.rel_path, job_id=job.id, source_format=checked.source_format,
                 width=checked.width, height=checked.height)
    return checked


def _stat_key(path: Path) -> tuple[int | None, int | None]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None, None
    return st.st_size, st.st_mtime_ns


def changed_since_taken(source: Path, job: Job) -> bool:
    """True when the file in the inbox is no longer the content this job recorded (gone is not changed)."""
    stat_key = _stat_key(source)
    return stat_key != (None, None) and stat_key != (job.size, job.mtime_ns)


def _wait_for_twin(ctx: Context, job: Job, twin: Job) -> StageOutcome:
    """Identical content is in flight in another job: wait for its result instead of paying again."""
    if job.duplicate_of != twin.id:
        log.info("job.waiting_for_duplicate", rel_path=job.rel_path, job_id=job.id, twin=twin.id,
                 twin_file=twin.rel_path)
    delay = max(1.0, ctx.config.api.poll_interval)
    _unpublish(ctx, job)
    ctx.journal.transition(job, JobState.PENDING, f"waiting for job #{twin.id} with the same content",
                           duplicate_of=twin.id, not_before=ctx.wall() + delay, hosted_key=None)
    ctx.notify()
    return StageOutcome(job.id)


def _reuse_result(ctx: Context, job: Job, twin: Job) -> bool:
    """Produce this job's output from its twin's: a copy of its output, or its media URL again."""
    twin_output = Path(twin.output_path) if twin.output_path else None
    if twin_output is not None and twin_output.exists():
        origin = "outbox copy"
    elif twin.state is JobState.DONE and twin.media_url:
        origin = "media URL"
    else:
        return False
    wanted = ctx.folders.output_path(job.rel_path)
    with temporary_file(wanted.parent) as (temp, f):
        try:
            if origin == "outbox copy":
                with open(twin_output, "rb") as src:
                    shutil.copyfileobj(src, f, 1024 * 1024)
            else:
                ctx.api.download(twin.media_url, f, int(ctx.config.api.max_download_mb * 1024 * 1024))
            finish_temp(f)
            converted = _decode_result(temp)
        except (DownloadError, FileNotFoundError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            log.info("job.duplicate_reuse_failed", rel_path=job.rel_path, job_id=job.id, twin=twin.id, error=str(exc))
            return False
        if converted is not None:
            _rewrite_as_png(temp, converted)
        output = _place_output(ctx, job, temp, wanted)
    job = ctx.journal.transition(ctx.journal.get(job.id), JobState.DELIVERING,
                                 f"same content and parameters as job #{twin.id}: result reused",
                                 duplicate_of=twin.id, output_path=str(output))
    ctx.journal.add_to_counter("duplicates_skipped")
    ctx.notify()
    log.info("job.duplicate", rel_path=job.rel_path, job_id=job.id, twin=twin.id, twin_file=twin.rel_path,
             reused=origin, output=str(output))
    finish_delivery(ctx, job)
    return True


def _record_submit(ctx: Context, job: Job, answer: SubmitAnswer, took: float) -> SubmitAnswer:
    verdict = answer.verdict
    if verdict is SubmitVerdict.ACCEPTED:
        polling_url = choose_polling_url(answer.polling_url, answer.request_id, ctx.config.api)
        ctx.journal.transition(job, JobState.SUBMITTED, f"accepted as {answer.request_id}",
                               request_id=answer.request_id, polling_url=polling_url, remote_status="QUEUED",
                               submitted_at=ctx.wall(), submit_attempts=job.submit_attempts + 1)
        log.info("job.submitted", rel_path=job.rel_path, job_id=job.id, request_id=answer.request_id,
                 params=job.params, duration=took)
    elif verdict is SubmitVerdict.REJECTED:
        fail(ctx, job, "rejected", answer.message, api_error=answer.message)
    elif verdict is SubmitVerdict.AMBIGUOUS:
        fail(ctx, job, "submit_ambiguous",
             "the submit may have reached the provider but its answer was lost; it is not resent "
             "automatically so it cannot be paid for twice (" + answer.message + "). " + RESEND_HINT)
    else:
        counts = verdict is SubmitVerdict.RETRY and answer.http_status != 429
        _back_to_pending(ctx, job, answer.message, count_attempt=counts, retry_after=answer.retry_after,
                         quiet=verdict in (SubmitVerdict.NO_BALANCE, SubmitVerdict.AUTH))
    return answer


def _back_to_pending(ctx: Context, job: Job, reason: str, *, count_attempt: bool,
                     retry_after: float | None = None, quiet: bool = False) -> StageOutcome:
    """Unpublish and queue the job again after a delay; fail it once attempts run out."""
    reason = mask_secrets(reason)
    attempts = job.submit_attempts + (1 if count_attempt else 0)
    if attempts >= ctx.config.api.max_attempts:
        job = ctx.journal.update(job, submit_attempts=attempts)
        fail(ctx, job, "attempts_exhausted", f"gave up after {attempts} attempts; last error: {reason}")
        return StageOutcome(job.id)
    _unpublish(ctx, job)
    delay = retry_after if retry_after is not None else full_jitter(attempts, base=1.0, cap=300.0)
    ctx.journal.transition(job, JobState.PENDING, reason, submit_attempts=attempts, hosted_key=None,
                           not_before=ctx.wall() + delay, last_error=reason)
    if not quiet:
        log.warning("job.retry_later", rel_path=job.rel_path, job_id=job.id, reason=reason,
                    attempt=attempts, delay=round(delay, 2))
    ctx.notify()
    return StageOutcome(job.id)


# --------------------------------------------------------------------------- poll


def poll(ctx: Context, job: Job) -> StageOutcome:
    """SUBMITTED -> ask the provider; on COMPLETED go straight on to deliver."""
    answer = ctx.api.poll(job.polling_url)
    verdict = answer.verdict
    if verdict is PollVerdict.WAITING:
        if answer.remote_status != job.remote_status:
            ctx.journal.update(job, remote_status=answer.remote_status)
            log.info("job.status", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                     status=answer.remote_status)
    elif verdict is PollVerdict.COMPLETED:
        job = ctx.journal.transition(job, JobState.DOWNLOADING, "provider completed", remote_status="COMPLETED",
                                     media_url=answer.media_url)
        ctx.notify()  # the slot is free: the next file can be submitted while this one downloads
        log.info("job.completed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                 provider_seconds=answer.provider_seconds,
                 duration=round(ctx.wall() - (job.submitted_at or ctx.wall()), 3))
        _unpublish(ctx, job)
        deliver(ctx, job)
    elif verdict is PollVerdict.FAILED:
        fail(ctx, job, "provider_failed", f"the provider reported FAILED: {answer.message}",
             api_error=answer.message)
    elif verdict is PollVerdict.ERROR:
        log.warning("job.status", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                    status="ERROR", error=answer.message)
        # The accepted submit was counted already: an ERROR is not a second attempt.
        _back_to_pending(ctx, job, f"provider system error (not charged): {answer.message}", count_attempt=False)
    else:
        log.warning("job.poll_error", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                    error=answer.message)
    return StageOutcome(job.id, poll=answer)


# --------------------------------------------------------------------------- deliver


def deliver(ctx: Context, job: Job) -> None:
    """DOWNLOADING -> result into the outbox (atomically) -> DELIVERING -> archive -> DONE."""
    if job.output_path and Path(job.output_path).exists():
        output = Path(job.output_path)  # placed before a crash, not yet recorded as delivered
    else:
        output = _download_into_outbox(ctx, job)
        if output is None:
            return
    job = ctx.journal.transition(ctx.journal.get(job.id), JobState.DELIVERING, "output written",
                                 output_path=str(output))
    log.info("job.delivered", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
             output=str(output), bytes=output.stat().st_size)
    finish_delivery(ctx, job)


def _download_into_outbox(ctx: Context, job: Job) -> Path | None:
    wanted = ctx.folders.output_path(job.rel_path)
    max_bytes = int(ctx.config.api.max_download_mb * 1024 * 1024)
    started = time.monotonic()
    # Errors writing the outbox (disk full, read-only) are not caught here: they reach the
    # scheduler, which keeps the job and tries again later, however long the fault lasts.
    with temporary_file(wanted.parent) as (temp, f):
        try:
            size = ctx.api.download(job.media_url, f, max_bytes)
        except DownloadError as exc:
            _download_failed(ctx, job, str(exc), exc.retryable)
            return None
        finish_temp(f)
        try:
            converted = _decode_result(temp)
        except (OSError, SyntaxError, ValueError) as exc:  # the bytes on disk are complete: a bad result
            _download_failed(ctx, job, f"the result is not a readable image: {exc}", retryable=True)
            return None
        if converted is not None:
            _rewrite_as_png(temp, converted)
        output = _place_output(ctx, job, temp, wanted)
    log.info("job.downloaded", rel_path=job.rel_path, job_id=job.id, bytes=size,
             duration=round(time.monotonic() - started, 3))
    return output


def _place_output(ctx: Context, job: Job, temp: Path, wanted: Path) -> Path:
    """Link the finished temp file into the outbox under a free name recorded first (no doubles)."""
    intended = free_name(wanted)
    job = ctx.journal.update(ctx.journal.get(job.id), output_path=str(intended))
    output = claim_name(temp, intended)
    if output != intended:
        ctx.journal.update(job, output_path=str(output))
    if output.name != wanted.name:
        log.warning("output.renamed", rel_path=job.rel_path, job_id=job.id, wanted=str(wanted), output=str(output),
                    reason="a file of that name already exists in the outbox")
    return output


def _decode_result(path: Path) -> Image.Image | None:
    """Decode the result fully (proof it is an image); an image to re-save if it is not a PNG."""
    with Image.open(path) as image:
        image.load()
        if image.format == "PNG":
            return None
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def _rewrite_as_png(path: Path, image: Image.Image) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        image.save(f, format="PNG")
        finish_temp(f)


def _download_failed(ctx: Context, job: Job, reason: str, retryable: bool) -> None:
    attempts = job.download_attempts + 1
    if not retryable or attempts >= ctx.config.api.max_attempts:
        fail(ctx, job, "download_failed", f"could not fetch the result after {attempts} attempt(s): {reason}")
        return
    delay = full_jitter(attempts, base=1.0, cap=60.0)
    ctx.journal.update(job, download_attempts=attempts, not_before=ctx.wall() + delay, last_error=reason)
    log.warning("job.download_retry", rel_path=job.rel_path, job_id=job.id, error=reason, attempt=attempts,
                delay=round(delay, 2))


def finish_delivery(ctx: Context, job: Job) -> None:
    """DELIVERING -> original to the archive, publication gone -> DONE. Safe to run again."""
    source = ctx.inbox / job.rel_path
    if not os.path.lexists(source):
        _require_inbox(ctx)  # archived by an earlier run, or deleted: fine, but not while the inbox is away
    elif changed_since_taken(source, job):
        log.warning("file.changed_after_taken", rel_path=job.rel_path, job_id=job.id,
                    detail="left in the inbox; its new content is taken as new work")
    else:
        job = _move_original(ctx, job, source, ctx.folders.archive_path(job.rel_path))
        log.info("file.archived", rel_path=job.rel_path, job_id=job.id, archived=job.final_path)
    _unpublish(ctx, job)
    _remove_staged(ctx, job)
    job = ctx.journal.transition(job, JobState.DONE, "restored", finished_at=ctx.wall())
    log.info("job.done", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id, output=job.output_path,
             duration=round(job.finished_at - job.created_at, 3))


def _move_original(ctx: Context, job: Job, source: Path, wanted: Path) -> Job:
    """Move the original to a free name under `wanted`, recording the name before moving."""
    if job.final_path is None:
        job = ctx.journal.update(job, final_path=str(free_name(wanted)))
    while True:
        try:
            move_to(source, Path(job.final_path))
            return job
        except FileExistsError:  # someone else's file took the name since: pick the next one
            job = ctx.journal.update(job, final_path=str(free_name(wanted)))


# --------------------------------------------------------------------------- fail


def fail(ctx: Context, job: Job, kind: str, reason: str, *, api_error: str | None = None) -> None:
    """Any unfinished state -> FAILING (recorded first) -> original to failed/ with its reason."""
    reason = mask_secrets(reason)
    api_error = mask_secrets(api_error) if api_error else api_error
    try:
        job = ctx.journal.transition(job, JobState.FAILING, reason, error_kind=kind, last_error=reason)
    except StaleTransition:
        return
    ctx.notify()
    finish_failing(ctx, job, api_error=api_error)


def finish_failing(ctx: Context, job: Job, api_error: str | None = None) -> None:
    """FAILING -> the original into failed/ beside <name>.error.json -> FAILED. Safe to run again."""
    _unpublish(ctx, job)
    source = ctx.inbox / job.rel_path
    if not os.path.lexists(source):
        _require_inbox(ctx)
    elif not changed_since_taken(source, job):
        job = _move_original(ctx, job, source, ctx.folders.failed_path(job.rel_path))
    final = Path(job.final_path) if job.final_path else None
    record_path = (final or ctx.folders.failed_path(job.rel_path))
    record_path = record_path.with_name(record_path.name + ".error.json")
    if not _is_record_of(record_path, job):
        write_json_atomically(record_path, {
            "file": job.rel_path,
            "failed_at": iso(ctx.wall()),
            "stage": job.error_kind,
            "reason": job.last_error,
            "request_id": job.request_id,
            "api_error": api_error,
            "submit_attempts": job.submit_attempts,
            "job_id": job.id,
            "history": [{"at": iso(e["at"]), "from": e["from_state"], "to": e["to_state"], "detail": e["detail"]}
                        for e in ctx.journal.history(job.id)],
        })
    _remove_staged(ctx, job)
    job = ctx.journal.transition(job, JobState.FAILED, job.last_error, finished_at=ctx.wall())
    log.error("job.failed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id, stage=job.error_kind,
              reason=job.last_error, moved_to=str(final) if final else None)


# --------------------------------------------------------------------------- helpers


def _is_record_of(path: Path, job: Job) -> bool:
    """True if `path` is this job's error record (already written before a crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("job_id") == job.id
    except (OSError, ValueError, AttributeError):
        return False


def _unpublish(ctx: Context, job: Job) -> None:
    if job.hosted_key:
        ctx.host.close_callback(job.hosted_key.split(".")[0])
        try:
            ctx.host.unpublish(job.hosted_key)
        except HostingError as exc:
            log.warning("file.unpublish_failed", rel_path=job.rel_path, job_id=job.id,
                        key=key_for_logs(job.hosted_key), error=str(exc))
            return
        log.debug("file.unpublished", rel_path=job.rel_path, job_id=job.id, key=key_for_logs(job.hosted_key))


def _remove_staged(ctx: Context, job: Job) -> None:
    if job.upload_path and Path(job.upload_path).parent == ctx.staging:
        with contextlib.suppress(FileNotFoundError):
            Path(job.upload_path).unlink()


class InboxUnavailable(OSError):
    """The inbox folder itself is missing or unreadable: an environment fault, not a vanished file."""


def _require_inbox(ctx: Context) -> None:
    """Raise InboxUnavailable when a job's source is missing because the whole inbox is.

    A share unmounted or a disk pulled is no reason to drop the job or skip its archiving: raised
    from a stage, the scheduler keeps the job and retries it later. The watcher's verdict (recorded
    in the journal) also covers an unmounted share whose empty mount point still looks like a folder.
    """
    reason = ctx.journal.get_meta("inbox_unavailable") or probe_inbox(ctx.inbox)[1]
    if reason is not None:
        raise InboxUnavailable(f"the inbox is unavailable ({reason}); the job waits for it")
