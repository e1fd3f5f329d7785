"""What comes into the queue: settled files from the watcher, each taken with its folder's settings,
and failed files that `retry` sent back; with the inbox's health and the folder settings that hold
files back, as `status` shows them.

The scheduler runs these as steps of its loop, on its own thread, so the watcher never sees a
returned file without its job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import structlog

from . import retry
from .context import Context
from .jobs import NewJob
from .profiles import HELD_RETRY_SECONDS, SETTINGS_META, FolderSettings, Held
from .watcher import InboxWatcher

log = structlog.get_logger("daemon.intake")

NEW_FILES_PER_PASS = 500
"""Settled files recorded per pass at most: a backlog of thousands becomes jobs over a few passes,
so the loop goes on submitting and polling meanwhile."""


class Intake:
    """New files and retried ones into the journal, each with the settings of its folder."""

    def __init__(self, ctx: Context, watcher: InboxWatcher, clock: Callable[[], float]) -> None:
        self.ctx = ctx
        self.watcher = watcher
        self.clock = clock
        self.folder_settings = FolderSettings(ctx.inbox, ctx.wall)
        """The settings each new file is taken with: profiles and the folders' codeformer.yaml files."""
        self._inbox_state_recorded: str | None = "(nothing recorded yet)"
        """What `watch_inbox` last wrote for `status`; this first value makes the first pass write it."""
        self._settings_recorded: dict[str, str] | None = None
        """What `_follow_folder_settings` last wrote for `status`; None makes the first pass write it."""
        self._next_settings_check = 0.0

    def watch_inbox(self) -> bool:
        """Keep the watcher watching (a dead observer, a vanished inbox) and record the inbox's state
        for this station's stages and for `status`. True when the inbox has just come back."""
        self.watcher.check_health()
        self.ctx.watched_inbox = self.watcher.identity
        reason = self.ctx.inbox_unavailable = self.watcher.unavailable_reason
        if reason == self._inbox_state_recorded:
            return False
        self.ctx.journal.note_inbox(reason)
        self._inbox_state_recorded = reason
        return reason is None

    def take_retry_requests(self) -> None:
        """Failed files that `codeformer-daemon retry` asked for go back into the inbox as pending jobs."""
        if self.watcher.available:
            retry.take_requests(self.ctx.journal, self.ctx.inbox)

    def take_new_files(self) -> None:
        """Settled files from the watcher become PENDING jobs, each with the settings of its folder
        (daemon.profiles) as they are now; a file whose folder settings file is invalid waits."""
        journal = self.ctx.journal
        sightings = self.watcher.take_settled(journal.active_jobs_for, limit=NEW_FILES_PER_PASS)
        if journal.store.shared and sightings:
            # Another station may have restored and archived a file since this one saw it settle (a
            # restart's first scan lags behind the share): a file no longer there is not taken.
            sightings = [s for s in sightings if os.path.lexists(self.ctx.inbox / s.rel_path)]
        settings = self.folder_settings.settings_for(self.ctx.config, [s.rel_path for s in sightings])
        self._follow_folder_settings()
        held = [s for s in sightings if isinstance(settings[s.rel_path], Held)]
        if held:
            self.watcher.hold_back(held)
        taken = [(s, settings[s.rel_path]) for s in sightings if not isinstance(settings[s.rel_path], Held)]
        if not taken:
            return
        waited = {s.rel_path: s.waited for s, _ in taken}
        added = journal.add_jobs([NewJob(s.rel_path, s.size, s.mtime_ns, chosen.params, chosen.profile, chosen.output)
                                  for s, chosen in taken])
        self.ctx.metrics.detected(len(added))
        for job in added:
            log.info("file.detected", rel_path=job.rel_path, job_id=job.id, size=job.size,
                     settle_wait=round(waited[job.rel_path], 3), profile=job.profile)

    def _follow_folder_settings(self) -> None:
        """Keep `status` on the folder settings files that hold files back, and notice a fixed or
        removed one even when no file of its folder comes by (read again every few seconds)."""
        folder_settings, now = self.folder_settings, self.clock()
        if folder_settings.problems and now >= self._next_settings_check and self.watcher.available:
            self._next_settings_check = now + HELD_RETRY_SECONDS
            folder_settings.recheck(self.ctx.config)
        if folder_settings.problems != self._settings_recorded:
            problems = dict(folder_settings.problems)
            self.ctx.journal.set_meta(SETTINGS_META, json.dumps(problems, sort_keys=True) if problems else None)
            self._settings_recorded = problems
