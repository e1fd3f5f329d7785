"""The command host: programs people already use (rclone, scp, a script) upload and delete each scan.

`hosting.command.publish` and `unpublish` are argument lists run without a shell, so a file name can
never be read as shell syntax. Placeholders, replaced inside each argument: `{path}` (the local file
to upload), `{key}` (the random remote name: the original name never leaves the machine) and
`{content_type}`; unpublish knows only `{key}`. The URL handed to the provider is
`url_template` with `{key}` filled in, or else the last non-empty line the publish command prints.

Programs run in a session of their own, so that a timeout kills whatever they started too, with the
daemon's environment minus what was handed to the daemon itself (`child_environment`): every
`CODEFORMER_*` variable (the API key among them), and what systemd gives the service's main process
(`CREDENTIALS_DIRECTORY`, where the API key and the other adapters' credentials are; the notify,
watchdog and socket-activation variables, which speak for the daemon). What the operator set for the
program (`RCLONE_*`, `AWS_*`, `SSH_AUTH_SOCK`, `HOME`, `PATH`) passes through: with this adapter the
daemon itself uses none of it. This keeps secrets out of a script that logs its environment, but
it is no sandbox: the program runs as the daemon's user, who can read /run/credentials/ anyway.

A command cannot list what it published, so `sweep` removes nothing (0): a lifecycle rule on the
remote side is the safety net for a crash's orphans.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from ..config import CommandHostConfig
from .base import HostingAdapter, HostingError, check_regular_file, key_for_logs
from .remote import tail

log = structlog.get_logger("daemon.hosting.command")

KILL_GRACE = 5.0
"""Seconds to collect a killed command's output before giving up on it."""
DAEMON_PREFIX = "CODEFORMER_"
"""The daemon's own variables (its API key is CODEFORMER_API_KEY): none is for the program."""
SERVICE_HANDOVER = frozenset({
    "CREDENTIALS_DIRECTORY",  # LoadCredential=: the API key, the S3 and WebDAV secrets
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",  # sd_notify: only the daemon speaks for itself
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",  # socket activation: sockets meant for the daemon
})
"""What systemd hands the service's main process; a program it runs must not take it for its own."""


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the daemon's own variables and systemd's hand-over to the daemon (see above)."""
    return {name: value for name, value in environ.items()
            if not name.startswith(DAEMON_PREFIX) and name not in SERVICE_HANDOVER}


class CommandHost(HostingAdapter):
    """Runs `publish` / `unpublish` for each key; the URL comes from `url_template` or the output."""

    name = "command"

    def __init__(self, settings: CommandHostConfig, environ: Mapping[str, str] | None = None) -> None:
        if not settings.publish or not settings.unpublish:
            raise HostingError("hosting.command.publish: publish and unpublish are required")
        self.settings = settings
        source = os.environ if environ is None else environ
        self._environ = child_environment(source)

    def start(self) -> None:
        for which, argv in (("publish", self.settings.publish), ("unpublish", self.settings.unpublish)):
            program = argv[0]
            found = shutil.which(program, path=self._environ.get("PATH"))
            if found is None:
                raise HostingError(f"hosting.command.{which}: cannot run {program!r}: not found, or not executable"
                                   + ("" if "/" in program else " on PATH"))
        log.info("hosting.started", adapter=self.name, publish=self.settings.publish[0],
                 unpublish=self.settings.unpublish[0], url_from="url_template" if self.settings.url_template
                 else "the publish command's output", timeout=self.settings.timeout)

    def publish(self, key: str, path: Path, content_type: str) -> str:
        check_regular_file(path)  # the program reads it itself; at least it is no link now
        values = {"{path}": str(path), "{key}": key, "{content_type}": content_type}
        stdout = self._run("publish", self.settings.publish, values, key)
        if self.settings.url_template:
            return self.settings.url_template.replace("{key}", key)
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        url = lines[-1] if lines else ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
            got = "nothing" if not url else f"{tail(url, hide=key, limit=80)!r}"
            raise HostingError(f"hosting.command.publish: {self.settings.publish[0]!r} printed no http(s) URL on "
                               f"its last line (got {got}); print the public URL last, or set "
                               "hosting.command.url_template")
        return url

    def unpublish(self, key: str) -> None:
        self._run("unpublish", self.settings.unpublish, {"{key}": key}, key)

    def _run(self, which: str, template: tuple[str, ...], values: dict[str, str], key: str) -> str:
        """Run one command to completion; its stdout, or HostingError saying why (with its stderr's end)."""
        argv = [_fill(argument, values) for argument in template]
        program = template[0]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self._environ, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise HostingError(f"hosting.command.{which}: cannot run {program!r}: {exc.strerror or exc}") from None
        try:
            stdout, stderr = proc.communicate(timeout=self.settings.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                _, stderr = proc.communicate(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes
                stderr = b""
            raise HostingError(f"hosting.command.{which}: {program!r} did not finish within "
                               f"{self.settings.timeout:g} s and was killed{_stderr_note(stderr, key)}") from None
        if proc.returncode != 0:
            status = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                      else f"exited with status {proc.returncode}")
            raise HostingError(f"hosting.command.{which}: {program!r} {status} for key {key_for_logs(key)}"
                               f"{_stderr_note(stderr, key)}")
        return stdout.decode("utf-8", errors="replace")


def _fill(argument: str, values: dict[str, str]) -> str:
    """Placeholders replaced in one pass, so a value that contains `{key}` is never expanded again."""
    out, i = [], 0
    while i < len(argument):
        for placeholder, value in values.items():
            if argument.startswith(placeholder, i):
                out.append(value)
                i += len(placeholder)
                break
        else:
            out.append(argument[i])
            i += 1
    return "".join(out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _stderr_note(stderr: bytes, key: str) -> str:
    text = tail(stderr, hide=key)
    return f"; stderr: {text}" if text else "; it wrote nothing to stderr"
