"""Identical content is paid for once: what a job does about a twin (same content, same parameters).

`duplicate_action` decides, by a table of cases; the rest carries the decision out: reuse the
twin's result (a copy of its output, or its media URL fetched again), or wait for it.
"""

from __future__ import annotations

import enum

import structlog

from .api import DownloadError
from .context import Context, StageOutcome, unpublish
from .finishing import BadResult, copy_output, finish_delivery, placed_output, write_result
from .jobs import Job, JobState
from .previews import copy_preview, enabled_folder

log = structlog.get_logger("daemon.stages")


class DuplicateAction(str, enum.Enum):
    """What a job does about an identical job (same content, same parameters)."""

    REUSE = "reuse"
    """Make this job's output from the twin's result: nothing is paid."""
    WAIT = "wait"
    """The twin is on its way (or ahead in the queue): wait for its result instead of paying again."""
    SUBMIT = "submit"
    """The twin is done but its result is gone (output collected, media URL expired): pay again."""


def duplicate_action(twin: Job, *, tried: bool) -> DuplicateAction:
    """The decision for one twin; `tried`: its result was already looked for and not found."""
    if twin.state is JobState.DONE:
        return DuplicateAction.SUBMIT if tried else DuplicateAction.REUSE
    if twin.state is JobState.DELIVERING and twin.output_path and not tried:
        return DuplicateAction.REUSE  # its output is in the outbox already
    return DuplicateAction.WAIT


def handle_twin(ctx: Context, job: Job, twin: Job, tried_twins: set[int]) -> StageOutcome | None:
    """Carry out `duplicate_action` for one twin; None means: go on and submit this job."""
    action = duplicate_action(twin, tried=twin.id in tried_twins)
    if action is DuplicateAction.REUSE:
        if reuse_result(ctx, job, twin):
            return StageOutcome(job.id)
        tried_twins.add(twin.id)
        action = duplicate_action(twin, tried=True)
        if action is DuplicateAction.SUBMIT:
            log.info("job.duplicate_result_gone", rel_path=job.rel_path, job_id=job.id, twin=twin.id,
                     reason="the earlier output and media URL are gone; submitting again")
    if action is DuplicateAction.WAIT:
        return wait_for_twin(ctx, job, twin)
    return None


def wait_for_twin(ctx: Context, job: Job, twin: Job) -> StageOutcome:
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


def reuse_result(ctx: Context, job: Job, twin: Job) -> bool:
    """Produce this job's output from its twin's: a copy of its output, or its media URL again."""
    twin_output = placed_output(twin)
    try:
        if twin_output is not None:
            origin, output = "outbox copy", copy_output(ctx, job, twin_output)
            if (previews := enabled_folder(ctx.config)) is not None:  # the same result: the same preview
                copy_preview(previews, twin.id, job.id, "after")
        elif twin.state is JobState.DONE and twin.media_url:
            max_bytes = int(ctx.config.api.max_download_mb * 1024 * 1024)
            origin, (output, _facts) = "media URL", write_result(
                ctx, job, lambda f: ctx.metrics.downloaded(ctx.api.download(twin.media_url, f, max_bytes)),
                request_id=twin.request_id)
        else:
            return False
    except (DownloadError, BadResult, FileNotFoundError) as exc:
        log.info("job.duplicate_reuse_failed", rel_path=job.rel_path, job_id=job.id, twin=twin.id, error=str(exc))
        return False
    job = ctx.journal.transition(ctx.journal.get(job.id), JobState.DELIVERING,
                                 f"same content and parameters as job #{twin.id}: result reused",
                                 duplicate_of=twin.id, output_path=str(output))
    ctx.journal.add_to_counter("duplicates_skipped")
    ctx.notify()
    log.info("job.duplicate", rel_path=job.rel_path, job_id=job.id, twin=twin.id, twin_file=twin.rel_path,
             reused=origin, output=str(output))
    finish_delivery(ctx, job)
    return True
