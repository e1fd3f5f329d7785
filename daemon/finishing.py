"""The end of a job: delivering its result, or failing it with the reason.

Delivering: the result into the outbox (checked, atomically, under a name recorded first with the
result's hash), then the original into the archive. Failing: the original into failed/ beside its
.error.json. Each step is recorded in the journal before its side effect and is safe to run again
after a crash. The launch and poll stages (daemon.stages) build on this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import structlog

from .api import DownloadError
from .context import Context, changed_since_taken, pinned_original, remove_staged, require_inbox, unpublish
from .jobs import Charge, Job, JobState, StaleTransition
from .logging import mask_secrets
from .outbox import claim_name, finish_temp, free_name, move_to, temporary_file, write_json_atomically
from .output.pipeline import BadResult, Origin, OutputFacts, pixel_cap, rendered
from .pacing import full_jitter
from .preflight import sha256_of
from .previews import wanted as wanted_preview
from .profiles import output_config

log = structlog.get_logger("daemon.finishing")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- deliver


def deliver(ctx: Context, job: Job) -> None:
    """DOWNLOADING -> result into the outbox (atomically) -> DELIVERING -> archive -> DONE."""
    output, facts = placed_output(job), None  # placed before a crash, not yet recorded as delivered
    if output is None:
        made = _download_into_outbox(ctx, job)
        if made is None:
            return
        output, facts = made
    job = ctx.journal.get(job.id)
    # The archive name is chosen now, in the same commit: `_move_original` needs it recorded first.
    archive_name = {} if job.final_path else {"final_path": str(free_name(ctx.folders.archive_path(job.rel_path)))}
    job = ctx.journal.transition(job, JobState.DELIVERING, "output written", output_path=str(output), **archive_name)
    if facts is not None and facts.unchanged:
        ctx.journal.add_to_counter("unchanged_delivered")
        log.warning("job.unchanged", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
                    detail="the provider returned the scan only resized: no face found or restored (delivered, "
                           "flagged in the label; output.unchanged: fail sends such scans to failed/)")
    log.info("job.delivered", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id,
             output=str(output), bytes=output.stat().st_size,
             **(dataclasses.asdict(facts) | {"sidecar": facts.sidecar is not None} if facts else {}))
    finish_delivery(ctx, job)


def _download_into_outbox(ctx: Context, job: Job) -> tuple[Path, OutputFacts] | None:
    max_bytes = int(ctx.config.api.max_download_mb * 1024 * 1024)
    started = time.monotonic()
    # Errors writing the outbox (disk full, read-only) are not caught here: they reach the
    # scheduler, which keeps the job and tries again later, however long the fault lasts.
    try:
        made = write_result(ctx, job, lambda f: ctx.metrics.downloaded(ctx.api.download(job.media_url, f, max_bytes)))
    except DownloadError as exc:
        _download_failed(ctx, job, str(exc), exc.retryable)
        return None
    except BadResult as exc:
        if exc.kind == "download_failed":
            _download_failed(ctx, job, exc.reason, exc.retryable)
        else:  # judged, not broken: fetching it again would bring the same
            fail(ctx, job, exc.kind, exc.reason)
        return None
    log.info("job.downloaded", rel_path=job.rel_path, job_id=job.id, bytes=made[0].stat().st_size,
             duration=round(time.monotonic() - started, 3))
    return made


def write_result(ctx: Context, job: Job, fill: Callable[[BinaryIO], object], *,
                 request_id: str | None = None) -> tuple[Path, OutputFacts]:
    """The provider's result, written by `fill`, made into the output and placed under a name recorded first.

    Raises BadResult for a result that is no image, too large, blank or (if so configured) unchanged;
    whatever `fill` raises (a failed download) passes through. Nothing is left in the outbox unless placed.
    """
    directory = ctx.folders.output_path(job.rel_path, "").parent
    origin = Origin(scan=pinned_original(ctx, job), scan_sha256=job.sha256 or "",
                    request_id=request_id or job.request_id, params=job.params)
    cap = pixel_cap(ctx.config.preflight.max_pixels, job.params)
    with temporary_file(directory) as (raw, f):
        fill(f)
        finish_temp(f)
        title = PurePosixPath(job.rel_path).stem
        output_settings = output_config(job.output_settings, ctx.config.output)  # as when the file was taken
        with rendered(raw, directory, origin, output_settings, cap, title=title, c2pa_key=ctx.c2pa_key,
                      preview=wanted_preview(ctx.config, job.id, "after", upright=True)) as (final, facts):
            output = place_output(ctx, job, final, ctx.folders.output_path(job.rel_path, facts.extension))
    if facts.sidecar is not None:
        write_sidecar(output, facts.sidecar)
    return output, facts


def copy_output(ctx: Context, job: Job, source: Path) -> Path:
    """Another job's finished output, copied as it is (same content, same parameters) under this job's name."""
    directory = ctx.folders.output_path(job.rel_path, "").parent
    with temporary_file(directory) as (temp, f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1024 * 1024)
        finish_temp(f)
        return place_output(ctx, job, temp, ctx.folders.output_path(job.rel_path, source.suffix))


def write_sidecar(output: Path, record: dict) -> None:
    """`<output>.json` with the provenance record, unless an earlier run wrote it already."""
    sidecar = output.with_name(output.name + ".json")
    if not sidecar.exists():
        write_json_atomically(sidecar, record)


def placed_output(job: Job) -> Path | None:
    """This job's output if a run before a crash already placed it: the recorded name holding the
    recorded bytes. Another job may have taken the name in between (two scans with one stem)."""
    if not job.output_path or not os.path.isfile(job.output_path):
        return None
    if job.output_sha256 is None:  # recorded by a daemon older than the hash: trust the name
        return Path(job.output_path)
    try:
        with open(job.output_path, "rb") as f:
            same = sha256_of(f) == job.output_sha256
    except OSError:
        return None
    return Path(job.output_path) if same else None


def place_output(ctx: Context, job: Job, temp: Path, wanted: Path) -> Path:
    """Link the finished temp file into the outbox under a free name recorded first (no doubles).

    The result's hash is recorded with the name, so that after a crash the job adopts a file under
    that name only if it is really its own result.
    """
    with open(temp, "rb") as f:
        digest = sha256_of(f)
    intended = free_name(wanted)
    job = ctx.journal.update(ctx.journal.get(job.id), output_path=str(intended), output_sha256=digest)
    output = claim_name(temp, intended)
    if output != intended:
        ctx.journal.update(job, output_path=str(output))
    if output.name != wanted.name:
        log.warning("output.renamed", rel_path=job.rel_path, job_id=job.id, wanted=str(wanted), output=str(output),
                    reason="a file of that name already exists in the outbox")
    return output


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
        require_inbox(ctx)  # archived by an earlier run, or deleted: fine, but not while the inbox is away
    elif changed_since_taken(source, job):
        log.warning("file.changed_after_taken", rel_path=job.rel_path, job_id=job.id,
                    detail="left in the inbox; its new content is taken as new work")
        # A pin that is a hard link changed with it, so what the provider restored may not be the
        # content recorded: this job's result is never handed to a later twin.
        job = ctx.journal.update(job, sha256=None, final_path=None)  # nothing was archived
    else:
        job = _move_original(ctx, job, source, ctx.folders.archive_path(job.rel_path))
        log.info("file.archived", rel_path=job.rel_path, job_id=job.id, archived=job.final_path)
    unpublish(ctx, job)
    remove_staged(ctx, job)
    job = ctx.journal.transition(job, JobState.DONE, "restored", finished_at=ctx.wall())
    ctx.metrics.job_done(job.created_at, job.finished_at)
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


def transition_and_charge(ctx: Context, job: Job, to_state: JobState, detail: str, charge: Charge | None,
                          **changes: Any) -> Job:
    """Move `job` as `Journal.transition` does, and write the ledger line the move causes (if any) in
    the same commit: a paid submit is never recorded without its job's move, nor the move without it."""
    with ctx.journal.transaction():
        moved = ctx.journal.transition(job, to_state, detail, **changes)
        if charge is not None:
            add_to_ledger(ctx, moved, charge)
    return moved


def add_to_ledger(ctx: Context, job: Job, kind: Charge) -> None:
    """Write `job`'s line in the ledger of charges; call it inside the transaction of the move that causes it.

    A charge and its refund are both dated with the accepted submit (`submitted_at`), so a refund
    frees a place in the day and month that submit was counted in, whenever its ERROR came; a
    possible charge is dated now (a job sent again after an ERROR still holds the older submit's time).
    """
    dated = job.submitted_at if kind is not Charge.POSSIBLY_CHARGED and job.submitted_at is not None else ctx.wall()
    ctx.journal.record_charge(job.id, job.request_id, dated, kind)


def fail(ctx: Context, job: Job, kind: str, reason: str, *, api_error: str | None = None,
         charge: Charge | None = None) -> None:
    """Any unfinished state -> FAILING (recorded first, in one commit with the ledger line `charge` when
    the failure causes one) -> original to failed/ with its reason."""
    reason = mask_secrets(reason)
    api_error = mask_secrets(api_error) if api_error else api_error
    try:
        job = transition_and_charge(ctx, job, JobState.FAILING, reason, charge, error_kind=kind, last_error=reason)
    except StaleTransition:
        return
    ctx.metrics.job_failed(kind)
    ctx.notify()
    finish_failing(ctx, job, api_error=api_error)


def finish_failing(ctx: Context, job: Job, api_error: str | None = None) -> None:
    """FAILING -> the original into failed/ beside <name>.error.json -> FAILED. Safe to run again."""
    unpublish(ctx, job)
    source = ctx.inbox / job.rel_path
    if not os.path.lexists(source):
        require_inbox(ctx)
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
            "profile": job.profile,
            "params": job.params,
            "job_id": job.id,
            "history": [{"at": iso(e["at"]), "from": e["from_state"], "to": e["to_state"], "detail": e["detail"]}
                        for e in ctx.journal.history(job.id)],
        })
    remove_staged(ctx, job)
    job = ctx.journal.transition(job, JobState.FAILED, job.last_error, finished_at=ctx.wall())
    log.error("job.failed", rel_path=job.rel_path, job_id=job.id, request_id=job.request_id, stage=job.error_kind,
              reason=job.last_error, moved_to=str(final) if final else None)


def _is_record_of(path: Path, job: Job) -> bool:
    """True if `path` is this job's error record (already written before a crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("job_id") == job.id
    except (OSError, ValueError, AttributeError):
        return False
