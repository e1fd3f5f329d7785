"""The stages of a job up to the provider's answer, run on the worker pool: launch and poll.

Each stage does blocking I/O and records its outcome in the journal before the next side effect,
so that any of them can be cut short by a crash and simply run again. The scheduler decides *when*
a stage runs; a stage decides only what its own answer means for its job. What happens after the
provider (deliver) or instead of it (fail) lives in daemon.finishing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import UnidentifiedImageError

from .api import (PUBLISHED_URL, DownloadError, PollAnswer, PollVerdict, SubmitAnswer, SubmitVerdict,
                  choose_polling_url)
from .finishing import (Context, InboxUnavailable, changed_since_taken, decode_result, deliver, fail,
                        finish_delivery, finish_failing, place_output, require_inbox, rewrite_as_png, size_and_mtime,
                        unpublish)
from .hosting import HostingError, key_for_logs, new_key
from .journal import Job, JobState
from .logging import mask_secrets
from .outbox import finish_temp, temporary_file
from .pacing import full_jitter
from .preflight import PreflightError, PreflightResult, check_image

log = structlog.get_logger("daemon.stages")

RESEND_HINT = ("If the provider's dashboard shows no job for it, `codeformer-daemon retry <this file>` "
               "sends it again (`retry --all` leaves it out).")

__all__ = ["Context", "InboxUnavailable", "StageOutcome", "check_ahead", "deliver", "fail", "finish_delivery",
           "finish_failing", "launch", "poll", "unpublish"]


def without_published_url(text: str, key: str) -> str:
    """The provider's words with any URL holding this job's key (a presigned URL is a secret) cut out."""
    return re.sub(r"\S*" + re.escape(key) + r"\S*", PUBLISHED_URL, text)


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
        require_inbox(ctx)
        ctx.journal.transition(job, JobState.VANISHED, "left the inbox before it was sent")
        log.info("file.vanished", rel_path=job.rel_path, job_id=job.id)
        return StageOutcome(job.id)
    if job.sha256 and not changed_since_taken(source, job):  # cheap re-check while waiting for a twin
        twin = ctx.journal.find_twin(job)
        if twin is not None and twin.state is not JobState.DONE:
            return _wait_for_twin(ctx, job, twin)
    stat_key = size_and_mtime(source)
    checked, *checked_stat_key = ctx.prechecked.pop(job.id, (None, None, None))
    if checked is None or stat_key != tuple(checked_stat_key) or not checked.upload_path.exists():
        checked = _preflight(ctx, job, source)
        if checked is None:
            return StageOutcome(job.id)
        stat_key = size_and_mtime(source)  # after the hash: what the recorded content belongs to
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
        size, mtime_ns = size_and_mtime(source)
        ctx.prechecked[job.id] = (checked, size, mtime_ns)
    return StageOutcome(job.id)


def _preflight(ctx: Context, job: Job, source: Path) -> PreflightResult | None:
    """Run preflight; on a bad file fail the job (or mark it vanished) and return None."""
    if not os.path.lexists(source):
        require_inbox(ctx)
        ctx.journal.transition(job, JobState.VANISHED, "left the inbox before it was sent")
        log.info("file.vanished", rel_path=job.rel_path, job_id=job.id)
        return None
    try:
        checked = check_image(source, ctx.staging, f"job-{job.id}", max_pixels=ctx.config.preflight.max_pixels)
    except PreflightError as exc:
        if not os.path.lexists(source):
            require_inbox(ctx)
            ctx.journal.transition(job, JobState.VANISHED, "left the inbox during preflight")
            return None
        fail(ctx, job, "preflight", exc.reason)
        return None
    if checked.converted:
        log.info("file.converted", rel_path=job.rel_path, job_id=job.id, source_format=checked.source_format,
                 width=checked.width, height=checked.height)
    return checked


def _wait_for_twin(ctx: Context, job: Job, twin: Job) -> StageOutcome:
    """Identical content is in flight in another job: wait for its result instead of paying again."""
    if job.duplicate_of != twin.id:
        log.info("job.waiting_for_duplicate", rel_path=job.rel_path, job_id=job.id, twin=twin.id,
                 twin_file=twin.rel_path)
    delay = max(1.0, ctx.config.api.poll_interval)
    unpublish(ctx, job)
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
            converted = decode_result(temp)
        except (DownloadError, FileNotFoundError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            log.info("job.duplicate_reuse_failed", rel_path=job.rel_path, job_id=job.id, twin=twin.id, error=str(exc))
            return False
        if converted is not None:
            rewrite_as_png(temp, converted)
        output = place_output(ctx, job, temp, wanted)
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
    unpublish(ctx, job)
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
        ctx.notify()  # the slot is free: the next file can be submitted while this one downloads
        log.info("job.completed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                 provider_seconds=answer.provider_seconds,
                 duration=round(ctx.wall() - (job.submitted_at or ctx.wall()), 3))
        unpublish(ctx, job)
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
