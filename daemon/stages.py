"""The stages of a job up to the provider's answer, run on the worker pool: launch and poll.

Each stage does blocking I/O and records its outcome in the journal before the next side effect,
so that any of them can be cut short by a crash and simply run again. The scheduler decides *when*
a stage runs; a stage decides only what its own answer means for its job. What happens after the
provider (deliver) or instead of it (fail) lives in daemon.finishing, and what to do about identical
content in daemon.duplicates.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

import structlog

from .api import PUBLISHED_URL, PollVerdict, SubmitAnswer, SubmitVerdict, choose_polling_url
from .context import (Context, InboxUnavailable, StageOutcome, changed_since_taken, remove_staged, require_inbox,
                      size_and_mtime, staged_stem, unpublish)
from .duplicates import handle_twin, wait_for_twin
from .finishing import deliver, fail, finish_delivery, finish_failing, placed_output, transition_and_charge
from .hosting import HostingError, key_for_logs, new_key
from .jobs import Charge, Job, JobState
from .logging import mask_secrets
from .pacing import full_jitter
from .preflight import PreflightError, PreflightResult, check_image, converted_name, pin_holds
from .previews import wanted as wanted_preview
from .profiles import resolve_upscale

log = structlog.get_logger("daemon.stages")

RESEND_HINT = ("If the provider's dashboard shows no job for it, `codeformer-daemon retry <this file>` "
               "sends it again (`retry --all` leaves it out).")

__all__ = ["Context", "InboxUnavailable", "StageOutcome", "check_ahead", "deliver", "fail", "finish_delivery",
           "finish_failing", "launch", "poll", "unpublish"]


def without_published_url(text: str, key: str) -> str:
    """The provider's words with any URL holding this job's key (a presigned URL is a secret) cut out."""
    return re.sub(r"\S*" + re.escape(key) + r"\S*", PUBLISHED_URL, text)


# --------------------------------------------------------------------------- launch


def launch(ctx: Context, job: Job) -> StageOutcome:
    """PUBLISHING -> preflight, publish, submit -> SUBMITTED (or back to PENDING, or FAILING).

    Identical content with identical parameters is never paid for twice: a job whose twin is done
    reuses its result, and one whose twin is still in flight waits for it.
    """
    source = ctx.inbox / job.rel_path
    if placed_output(job) is not None:  # a reused result placed before a crash
        finish_delivery(ctx, ctx.journal.transition(job, JobState.DELIVERING, "reused result already in place"))
        return StageOutcome(job.id)
    if not os.path.lexists(source):
        _vanished(ctx, job, "left the inbox before it was sent")
        return StageOutcome(job.id)
    if job.sha256 and not changed_since_taken(source, job):  # cheap re-check while waiting for a twin
        twin = ctx.journal.find_twin(job)
        if twin is not None and twin.state is not JobState.DONE:
            return wait_for_twin(ctx, job, twin)
    checked, pinned = _pinned_check(ctx, job, source)
    if checked is None:
        return StageOutcome(job.id)
    tried_twins: set[int] = set()
    # An early look, before publishing (enter_submitting is the real guard), with what the check
    # found still in memory: a job without a twin records it with its key in one commit.
    twin = ctx.journal.find_twin(dataclasses.replace(job, **pinned))
    if twin is not None:
        job = ctx.journal.update(job, **pinned)
        outcome = handle_twin(ctx, job, twin, tried_twins)
        if outcome is not None:
            return outcome
        pinned = {}
    key = new_key(".png" if checked.content_type == "image/png" else ".jpg")
    job = ctx.journal.update(job, **pinned, hosted_key=key)  # before publishing: no object the journal misses
    try:
        url = ctx.host.publish(key, checked.upload_path, checked.content_type)
    except HostingError as exc:
        return _back_to_pending(ctx, job, f"publish failed: {exc}", count_attempt=True)
    size = size_and_mtime(checked.upload_path)[0]
    ctx.metrics.published(size)
    log.info("file.published", rel_path=job.rel_path, job_id=job.id, adapter=ctx.host.name,
             key=key_for_logs(key), bytes=size)

    webhook = None
    if ctx.config.hosting.builtin.webhook:
        job_id = job.id
        webhook = ctx.host.open_callback(key, lambda: ctx.poll_now(job_id))
    if ctx.stopping():  # asked to stop while publishing: do not start a submit now
        return _back_to_pending(ctx, job, "stopping: not submitted", count_attempt=False, retry_after=0, quiet=True)
    while True:
        submitting, twin = ctx.journal.enter_submitting(job, "submit about to be sent", tried_twins)
        if twin is None:
            break
        # An identical job got there first, after this one had looked: perhaps all the way to done
        # while this copy was being published (a slow upload).
        outcome = handle_twin(ctx, ctx.journal.get(job.id), twin, tried_twins)
        if outcome is not None:
            return outcome
    job = submitting
    sent_at = time.monotonic()
    answer = ctx.api.submit(url, job.params, webhook_url=webhook)
    took = round(time.monotonic() - sent_at, 3)
    return StageOutcome(job.id, submit=_record_submit(ctx, job, answer, took), sent_at=sent_at,
                        webhook=webhook is not None)


def _pinned_check(ctx: Context, job: Job, source: Path) -> tuple[PreflightResult | None, dict[str, Any]]:
    """This job's pinned, checked copy: the one checked ahead if it still holds, else a fresh preflight.

    Returns it with the job columns to record (the content's hash, size and mtime, the pin's path,
    and with `upscale: auto` the params with the factor chosen for this scan's size, which twins then
    compare), left to the caller to commit with its next change; None when the job went elsewhere
    (failed, vanished, or back to waiting for a scan still being written).
    """
    stat_key = size_and_mtime(source)
    checked, *checked_stat_key = ctx.prechecked.pop(job.id, (None, None, None))
    if checked is None or stat_key != tuple(checked_stat_key) or not checked.still_pinned():
        before = stat_key
        checked = _preflight(ctx, job, source)
        if checked is None:
            return None, {}
        stat_key = size_and_mtime(source)
        if stat_key != before:  # written to while it was pinned: the pin may be half of it
            _back_to_waiting(ctx, job, stat_key, "the file changed while it was being checked")
            return None, {}
    size, mtime_ns = stat_key
    pinned: dict[str, Any] = {"sha256": checked.sha256, "size": size, "mtime_ns": mtime_ns,
                              "upload_path": str(checked.upload_path)}
    params = resolve_upscale(job.params, checked.width, checked.height)
    if params != job.params:
        pinned["params"] = params
        log.info("job.upscale_chosen", rel_path=job.rel_path, job_id=job.id, upscale=params["upscale"],
                 width=checked.width, height=checked.height,
                 output_megapixels=round(checked.width * checked.height * params["upscale"] ** 2 / 1e6, 1),
                 max_upscale=job.params.get("max_upscale"),
                 max_output_megapixels=job.params.get("max_output_megapixels"))
    return checked, pinned


def check_ahead(ctx: Context, job: Job) -> StageOutcome:
    """PENDING: preflight a file before its slot frees, so a freed slot only publishes and submits.

    Bad files fail here at once, even while every slot is busy. The result is kept in memory
    with the file's size and mtime; `launch` checks again if either changed (or after a restart).
    """
    source = ctx.inbox / job.rel_path
    before = size_and_mtime(source)
    checked = _preflight(ctx, job, source)
    if checked is not None:
        ctx.prechecked[job.id] = (checked, *before)
    return StageOutcome(job.id)


def _preflight(ctx: Context, job: Job, source: Path) -> PreflightResult | None:
    """Pin and check the file; on a bad file fail the job (or mark it vanished) and return None.

    A verdict that a file still being written would also get (empty, truncated) fails the scan only
    when the writing is surely over; otherwise the job goes back to waiting (`still_being_written`).
    """
    if not os.path.lexists(source):
        _vanished(ctx, job, "left the inbox before it was sent")
        return None
    preview = wanted_preview(ctx.config, job.id, "before", unless_newer_than=source)
    try:
        checked = check_image(source, ctx.staging, staged_stem(job.id), max_pixels=ctx.config.preflight.max_pixels,
                              preview=preview)
    except PreflightError as exc:
        if not os.path.lexists(source):
            _vanished(ctx, job, "left the inbox during preflight")
            return None
        now_stat = size_and_mtime(source)
        if exc.may_be_incomplete and still_being_written(
                (job.size, job.mtime_ns), now_stat, ctx.wall(), ctx.config.watch.settle_seconds):
            _back_to_waiting(ctx, job, now_stat, exc.reason)
            return None
        fail(ctx, job, "preflight", exc.reason)
        return None
    if checked.converted:
        log.info("file.converted", rel_path=job.rel_path, job_id=job.id, source_format=checked.source_format,
                 width=checked.width, height=checked.height)
    if preview is not None:
        preview(checked.upload_path)  # a JPEG preflight only drafted; nothing if it made the preview already
    return checked


def _vanished(ctx: Context, job: Job, detail: str) -> None:
    """The file is gone from an inbox that is there (deleted or renamed away): nothing to send."""
    require_inbox(ctx)  # not while the whole inbox is away: then the job waits for it
    ctx.journal.transition(job, JobState.VANISHED, detail)
    remove_staged(ctx, job)
    log.info("file.vanished", rel_path=job.rel_path, job_id=job.id)


YOUNG_FILE_SETTLE_PERIODS = 3
"""A file modified less than this many settle periods ago may still be open for writing."""


def still_being_written(taken: tuple[int | None, int | None], now: tuple[int | None, int | None],
                        wall: float, settle_seconds: float) -> bool:
    """True when a scan that looks incomplete may simply not be finished yet.

    Its size or mtime changed since it was taken, or it was modified within the last few settle
    periods (a writer pausing longer than the settle time between chunks).
    """
    if now != taken:
        return True
    mtime_ns = now[1]
    if mtime_ns is None:
        return False
    age = wall - mtime_ns / 1e9
    return 0 <= age < YOUNG_FILE_SETTLE_PERIODS * settle_seconds  # a clock ahead of ours never keeps it young


def _back_to_waiting(ctx: Context, job: Job, stat_key: tuple[int | None, int | None], reason: str) -> None:
    """A scan that is still being written waits (not counted as an attempt) and is checked again later."""
    delay = max(1.0, 2 * ctx.config.watch.settle_seconds)
    size, mtime_ns = stat_key
    changes = {"not_before": ctx.wall() + delay, "size": size if size is not None else job.size,
               "mtime_ns": mtime_ns if mtime_ns is not None else job.mtime_ns, "hosted_key": None,
               "sha256": None}  # what it held is no longer what it will hold
    if job.state is JobState.PENDING:
        ctx.journal.update(job, **changes)
    else:
        ctx.journal.transition(job, JobState.PENDING, "still being written", **changes)
    log.info("file.still_being_written", rel_path=job.rel_path, job_id=job.id, detail=reason,
             check_again_in=round(delay, 2))
    ctx.notify()


def _record_submit(ctx: Context, job: Job, answer: SubmitAnswer, took: float) -> SubmitAnswer:
    verdict = answer.verdict
    if verdict is SubmitVerdict.ACCEPTED:
        polling_url = choose_polling_url(answer.polling_url, answer.request_id, ctx.config.api)
        transition_and_charge(ctx, job, JobState.SUBMITTED, f"accepted as {answer.request_id}", Charge.CHARGED,
                              request_id=answer.request_id, polling_url=polling_url, remote_status="QUEUED",
                              submitted_at=ctx.wall(), submit_attempts=job.submit_attempts + 1)
        log.info("job.submitted", rel_path=job.rel_path, job_id=job.id, request_id=answer.request_id,
                 params=job.params, duration=took)
    elif verdict is SubmitVerdict.REJECTED:
        fail(ctx, job, "rejected", answer.message, api_error=answer.message)
    elif verdict is SubmitVerdict.AMBIGUOUS:
        fail(ctx, job, "submit_ambiguous",
             "the submit may have reached the provider but its answer was lost; it is not resent "
             "automatically so it cannot be paid for twice (" + answer.message + "). " + RESEND_HINT,
             charge=Charge.POSSIBLY_CHARGED)
    else:
        counts = verdict is SubmitVerdict.RETRY and answer.http_status != 429
        _back_to_pending(ctx, job, answer.message, count_attempt=counts, retry_after=answer.retry_after,
                         quiet=verdict in (SubmitVerdict.NO_BALANCE, SubmitVerdict.AUTH))
    return answer


def _back_to_pending(ctx: Context, job: Job, reason: str, *, count_attempt: bool,
                     retry_after: float | None = None, quiet: bool = False,
                     charge: Charge | None = None) -> StageOutcome:
    """Unpublish and queue the job again after a delay; fail it once attempts run out. `charge` is the
    ledger line this step causes (a refund), committed with the job's move either way."""
    reason = mask_secrets(reason)
    attempts = job.submit_attempts + (1 if count_attempt else 0)
    if attempts >= ctx.config.api.max_attempts:
        job = ctx.journal.update(job, submit_attempts=attempts)
        fail(ctx, job, "attempts_exhausted", f"gave up after {attempts} attempts; last error: {reason}",
             charge=charge)
        return StageOutcome(job.id)
    unpublish(ctx, job)
    delay = retry_after if retry_after is not None else full_jitter(attempts, base=1.0, cap=300.0)
    transition_and_charge(ctx, job, JobState.PENDING, reason, charge, submit_attempts=attempts, hosted_key=None,
                          not_before=ctx.wall() + delay, last_error=reason)
    if not quiet:
        log.warning("job.retry_later", rel_path=job.rel_path, job_id=job.id, reason=reason,
                    attempt=attempts, delay=round(delay, 2))
    ctx.notify()
    return StageOutcome(job.id)


# --------------------------------------------------------------------------- poll


FETCH_FAILURE_WORDS = re.compile(r"fetch|download|retriev|could not (get|load|access|read|open)|unreachable|"
                                 r"not found|\b40[34]\b|timed? ?out", re.IGNORECASE)


def looks_like_fetch_failure(message: str) -> bool:
    """True when the provider's FAILED text says it could not get the image (rather than judging it)."""
    return bool(FETCH_FAILURE_WORDS.search(message or ""))


def _copy_was_available(ctx: Context, job: Job) -> bool:
    """Whether what this job published is still there to be fetched: its pinned copy, unchanged.

    Only a local fact the daemon can check; the remote side of an S3 or WebDAV upload that
    succeeded is taken to be there.
    """
    if not job.upload_path:
        return False
    upload = Path(job.upload_path)
    if not pin_holds(upload, job.sha256, converted=upload.name == converted_name(staged_stem(job.id))):
        return False
    # The built-in host serves nothing while the daemon is down: a job submitted before this start
    # may have been fetched in between.
    return ctx.host.serves_across_restarts or (job.submitted_at or 0.0) >= ctx.started_at


def poll(ctx: Context, job: Job) -> StageOutcome:
    """SUBMITTED -> ask the provider; on COMPLETED unpublish and hand the job on to DOWNLOADING."""
    answer = ctx.api.poll(job.polling_url)
    if job.hosted_key and job.hosted_key in answer.message:
        answer = dataclasses.replace(answer, message=without_published_url(answer.message, job.hosted_key))
    verdict = answer.verdict
    if verdict is PollVerdict.WAITING:
        if answer.remote_status != job.remote_status:
            ctx.journal.update(job, remote_status=answer.remote_status)
            log.info("job.status", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                     status=answer.remote_status)
    elif verdict is PollVerdict.COMPLETED:
        job = ctx.journal.transition(job, JobState.DOWNLOADING, "provider completed", remote_status="COMPLETED",
                                     media_url=answer.media_url)
        ctx.metrics.completed_at_provider(answer.provider_seconds, job.submitted_at, ctx.wall())
        ctx.notify()  # the slot is free: the next file can be submitted while this one downloads
        log.info("job.completed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                 provider_seconds=answer.provider_seconds,
                 duration=round(ctx.wall() - (job.submitted_at or ctx.wall()), 3))
        unpublish(ctx, job)
        # The delivery (download, image work) is the scheduler's to start, a few at a time: run
        # here, a burst of completions would take every core from the submits that refill the slots.
    elif verdict is PollVerdict.FAILED:
        if looks_like_fetch_failure(answer.message) and not _copy_was_available(ctx, job):
            # Not the scan's fault: the daemon's own copy was gone when the provider came for it.
            _back_to_pending(ctx, job, f"the provider could not fetch the scan while the published copy was "
                             f"unavailable: {answer.message}", count_attempt=True)
        else:
            fail(ctx, job, "provider_failed", f"the provider reported FAILED: {answer.message}",
                 api_error=answer.message)
    elif verdict is PollVerdict.ERROR:
        log.warning("job.status", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                    status="ERROR", error=answer.message)
        # The accepted submit was counted already: an ERROR is not a second attempt. Nor is it paid for.
        _back_to_pending(ctx, job, f"provider system error (not charged): {answer.message}", count_attempt=False,
                         charge=Charge.REFUNDED)
    else:
        log.warning("job.poll_error", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                    error=answer.message)
    return StageOutcome(job.id, poll=answer)
