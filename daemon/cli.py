"""The command line: run, status, check, retry, emulator, demo. Configures logging once, turns errors into exit codes."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time

import structlog

from . import __version__
from . import logging as daemon_logging
from .config import ConfigError, load_config, resolve_api_key, validate_for_run

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _error(message: str, code: int) -> int:
    print(f"codeformer-daemon: {message}", file=sys.stderr)
    return code


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` writes every thread's stack to stderr (the journal under systemd): what a
    daemon that seems stuck is doing, without stopping it."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def cmd_run(args: argparse.Namespace) -> int:
    from .scheduler import wake_on_signals
    from .service import Service, StartupError

    dump_stacks_on_sigusr1()

    try:
        config = load_config(args.config)
        validate_for_run(config)
        api_key = resolve_api_key(config)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}", EXIT_CONFIG)
    daemon_logging.register_secret(api_key.reveal())
    daemon_logging.configure(config.logging.format, config.logging.level)
    service = Service(config, api_key, config_path=args.config,
                      configure_logging=lambda changed: daemon_logging.configure(changed.format, changed.level))
    try:
        service.start()
    except StartupError as exc:
        structlog.get_logger("daemon").error("daemon.cannot_start", reason=str(exc))
        return _error(f"cannot start: {exc}", EXIT_FAILURE)

    def on_signal(signum: int, _frame: object) -> None:
        if service.stop_requested:
            os._exit(EXIT_FAILURE)  # second signal: stop hard; the journal holds every committed step
        service.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: service.request_reload())
    if service.scheduler is not None:
        wake_on_signals(service.scheduler.wake)
    clean = service.run()
    if not clean:
        # A stage is still inside a network call past shutdown_timeout; its job is safe in the journal
        # and resumes on the next start. Do not wait for the thread.
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _budget_lines(budget: dict) -> list[str]:
    """"budget (Europe/Berlin): today 3 of 3 images (0 left), this month 3 (no limit); 2 queued" and,
    with a price, the money spent and what the queue will cost."""
    from .budget import money_text

    def period(name: str, figures: dict) -> str:
        if figures["limit"] is None:
            return f"{name} {figures['used']} (no limit)"
        return f"{name} {figures['used']} of {figures['limit']} images ({figures['remaining']} left)"

    day, month, currency = budget["day"], budget["month"], budget["currency"]
    lines = [f"budget ({budget['timezone']}): {period('today', day)}, {period('this month', month)}; "
             f"{budget['queued']} queued"]
    if budget["price_per_image"] is not None:
        lines.append(f"spent: today {money_text(day['spent'], currency)}, this month "
                     f"{money_text(month['spent'], currency)}; the queued files will cost "
                     f"{money_text(budget['queued_cost'], currency)}")
    return lines


def _taken_with(job: dict) -> str:
    """" [portraits: upscale 4, fidelity 0.7]": the settings a status row's job was taken with."""
    params = job.get("params") or {}
    shown = [f"{name} {params[key]}" for key, name in (("upscale", "upscale"), ("codeformer_fidelity", "fidelity"))
             if key in params]
    profile = f"{job['profile']}: " if job.get("profile") else ""
    return f" [{profile}{', '.join(shown)}]" if shown or profile else ""


def render_status(summary: dict) -> str:
    lines = []
    if summary.get("fleet") is not None:
        lines.extend(_fleet_lines(summary["fleet"]))
    else:
        beat = summary["heartbeat_age_seconds"]
        running = beat is not None and beat < 10
        lines.append(f"daemon: {'running' if running else 'not running'} (last heartbeat {_age(beat)} ago)")
    if summary["paused"]:
        lines.append(f"paused: {summary['paused']}")
    if summary.get("oldest_pending"):
        oldest = summary["oldest_pending"]
        lines.append(f"oldest waiting: #{oldest['job_id']} {oldest['file']}, {_age(oldest['age_seconds'])}")
    if summary.get("inbox_unavailable"):
        lines.append(f"inbox: unavailable ({summary['inbox_unavailable']})")
    for reason in (summary.get("settings_invalid") or {}).values():
        lines.append(f"folder settings invalid: {reason} (the files it applies to wait in the inbox until it is fixed)")
    counts = {k: v for k, v in summary["counts"].items() if v}
    lines.append("jobs: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    if summary.get("budget"):
        lines.extend(_budget_lines(summary["budget"]))
    lines.append(f"submissions spent: {summary['submissions_spent']}, duplicates skipped: "
                 f"{summary['duplicates_skipped']}, ambiguous submits found at restart: "
                 f"{summary['ambiguous_at_restart']}, delivered unchanged (no face restored): "
                 f"{summary.get('unchanged_delivered', 0)}")
    if summary["in_flight"]:
        lines.append("in flight:")
        for job in summary["in_flight"]:
            remote = f" {job['remote_status']}" if job["remote_status"] else ""
            lines.append(f"  #{job['job_id']} {job['file']}: {job['state']}{remote}, {_age(job['age_seconds'])}"
                         f"{_taken_with(job)}")
    if summary["recent_failures"]:
        lines.append("recent failures:")
        for job in summary["recent_failures"]:
            lines.append(f"  #{job['job_id']} {job['file']}: {job['reason']}{_taken_with(job)}")
    return "\n".join(lines)


def _fleet_lines(fleet: list[dict]) -> list[str]:
    """The fleet's daemons, one line each: whether each runs, its last heartbeat, the jobs it holds."""
    alive = sum(node["alive"] for node in fleet)
    lines = [f"fleet: {alive} daemon{'s' if alive != 1 else ''} running"]
    for node in fleet:
        state = "silent (lease lapsed)" if node["state"] == "silent" else node["state"]
        lines.append(f"  {node['node']} on {node['host']} (pid {node['pid']}): {state}, last heartbeat "
                     f"{_age(node['heartbeat_age_seconds'])} ago, holding {node['holding']} "
                     f"job{'s' if node['holding'] != 1 else ''}")
    return lines


class CommandError(Exception):
    """Ends a command with this message on stderr and this exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _open_journal(config_path: str, *, read_only: bool):
    """The configuration and the journal a daemon with it keeps, for commands that run beside it."""
    from .journal import Journal, JournalError
    from .service import journal_path
    from .storage import open_store

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise CommandError(f"configuration error: {exc}", EXIT_CONFIG) from None
    path = journal_path(config)
    if config.state.backend == "sqlite" and not path.exists():
        raise CommandError(f"no journal at {path}: the daemon has not run with this state_dir yet", EXIT_FAILURE)
    try:
        return config, Journal(open_store(config, read_only=read_only))
    except (JournalError, ConfigError) as exc:
        raise CommandError(str(exc), EXIT_FAILURE) from None


def cmd_status(args: argparse.Namespace) -> int:
    from .journal import JournalError

    from .reports import status_report

    _config, journal = _open_journal(args.config, read_only=True)
    try:
        summary = status_report(journal, time.time())
    except JournalError as exc:
        return _error(str(exc), EXIT_FAILURE)
    finally:
        journal.close()
    print(json.dumps(summary, indent=2) if args.json else render_status(summary))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Send failed files through the pipeline again: the running daemon does it, or this command."""
    from .retry import RetryError, requeue, select_failed
    from .service import try_instance_lock

    if bool(args.paths) == args.all:
        return _error("retry: name the files in failed/ to send again, or --all (not both)", EXIT_CONFIG)
    config, journal = _open_journal(args.config, read_only=False)
    try:
        try:
            jobs, possibly_paid = select_failed(journal, config.folders.failed, args.paths, args.all)
        except RetryError as exc:
            return _error(str(exc), EXIT_FAILURE)
        for job in possibly_paid:
            print(f"{job.final_path} -> left out: it may already have been paid for ({job.error_kind}); "
                  "check the provider's dashboard, then name it to send it again")
        if not jobs:
            print("nothing to retry: failed/ holds no file this daemon failed")
            return EXIT_OK
        lock = try_instance_lock(config.state_dir)
        if lock is None:  # the daemon runs: it moves the files itself, between its own steps
            journal.request_retry([job.id for job in jobs])
            deadline = time.monotonic() + args.wait
            while journal.retry_requests() and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            try:
                for job in jobs:
                    try:
                        requeue(journal, config.folders.inbox, job)
                    except (RetryError, OSError) as exc:
                        print(f"codeformer-daemon: {job.rel_path}: cannot retry: {exc}", file=sys.stderr)
            finally:
                os.close(lock)
        return _report_retries(journal, jobs)
    finally:
        journal.close()


def _report_retries(journal, jobs) -> int:
    from .jobs import JobState

    waiting = set(journal.retry_requests())
    code = EXIT_OK
    for old in jobs:
        job = journal.get(old.id)
        if job.state is not JobState.FAILED:
            print(f"{old.final_path} -> back in the inbox as {job.rel_path} (job #{job.id})")
        elif job.id in waiting:
            print(f"{old.final_path} -> queued; the daemon has not taken it yet")
        else:
            print(f"{old.final_path} -> not retried; see the daemon's log (job.retry_refused)")
            code = EXIT_FAILURE
    return code


def cmd_pause(args: argparse.Namespace) -> int:
    """A person pauses new submits (the running daemon follows within a second; jobs in flight finish)."""
    from .control import pause_submits, resume_submits

    _config, journal = _open_journal(args.config, read_only=False)
    try:
        if args.command == "pause":
            changed = pause_submits(journal)
            print("submits paused: files wait in the inbox; jobs already at the provider finish"
                  if changed else "submits were already paused by a person")
        else:
            changed = resume_submits(journal)
            print("submits resumed" if changed else "submits were not paused by a person")
    finally:
        journal.close()
    return EXIT_OK


def cmd_migrate_state(args: argparse.Namespace) -> int:
    """Copy the SQLite journal into an empty PostgreSQL database, for a fleet of daemons to share."""
    from .migrate import MigrationError, migrate_state

    try:
        migration = migrate_state(load_config(args.config), args.dsn)
    except ConfigError as exc:
        return _error(f"configuration error: {exc}", EXIT_CONFIG)
    except MigrationError as exc:
        return _error(f"migrate-state: {exc}", EXIT_FAILURE)
    print(migration.summary())
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """One line per check, ok or the reason; non-zero if any failed. Nothing is submitted."""
    from .check import run_checks

    daemon_logging.configure("console", "warning")  # the lines below are the report; only trouble is logged
    results, config_unusable = run_checks(args.config)
    for result in results:
        print(result.line())
    if config_unusable:
        return EXIT_CONFIG
    return EXIT_OK if all(result.ok for result in results) else EXIT_FAILURE


def cmd_emulator(args: argparse.Namespace) -> int:
    from . import emulator

    try:
        return emulator.run(args)
    except ConfigError as exc:
        return _error(str(exc), EXIT_CONFIG)
    except OSError as exc:
        return _error(f"--listen {args.listen}: cannot listen there: {exc.strerror or exc}", EXIT_FAILURE)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, run_demo

    dump_stacks_on_sigusr1()
    # Ctrl-C (and a stop) end the demo even when it was started with SIGINT ignored, as a background
    # job of a script is: Python then leaves it ignored, and the demo would wait for ever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_demo(args.dir, count=args.count, latency=args.latency, dashboard=args.dashboard)
    except DemoError as exc:
        return _error(str(exc), EXIT_FAILURE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codeformer-daemon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="watch the inbox and restore every scan (foreground, until SIGTERM)")
    run.add_argument("--config", required=True, help="the YAML configuration file")
    run.set_defaults(handler=cmd_run)

    status = commands.add_parser("status", help="what the daemon is doing and has done (works while it runs)")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    check = commands.add_parser("check", help="prove the configuration, the key and the hosting round trip "
                                               "without spending anything (stop the daemon first if it "
                                               "uses the built-in host)")
    check.add_argument("--config", required=True)
    check.set_defaults(handler=cmd_check)

    again = commands.add_parser("retry", help="send files from failed/ through the pipeline again "
                                               "(once the cause is fixed); works while the daemon runs")
    again.add_argument("--config", required=True)
    again.add_argument("paths", nargs="*", metavar="PATH", help="files in failed/ (or their .error.json)")
    again.add_argument("--all", action="store_true", help="every file in failed/ this daemon failed")
    again.add_argument("--wait", type=float, default=10.0, help=argparse.SUPPRESS)
    again.set_defaults(handler=cmd_retry)

    for name, words in (("pause", "stop new submits until `resume` (jobs already at the provider finish)"),
                        ("resume", "let submits go on after `pause`")):
        person = commands.add_parser(name, help=words + "; works while the daemon runs")
        person.add_argument("--config", required=True)
        person.set_defaults(handler=cmd_pause)

    migrate = commands.add_parser("migrate-state", help="copy this daemon's SQLite journal into an empty PostgreSQL "
                                                         "database, for a fleet of daemons to share (stop it first)")
    migrate.add_argument("--config", required=True)
    migrate.add_argument("--to", required=True, choices=["postgresql"], help="the database to move to")
    migrate.add_argument("--dsn", help="the PostgreSQL database to copy into (default: state.postgresql.dsn)")
    migrate.set_defaults(handler=cmd_migrate_state)

    from . import emulator

    emu = commands.add_parser("emulator", help="run the local gateway emulator (it does not restore faces: "
                                                "its output is the input resized by upscale, contrast raised "
                                                "in the middle)")
    emulator.add_arguments(emu)
    emu.set_defaults(handler=cmd_emulator)

    demo = commands.add_parser("demo", help="restore a few generated photos end to end against the emulator")
    demo.add_argument("--dir", default="codeformer-demo", help="folder to create for the demo (default: %(default)s)")
    demo.add_argument("--count", type=int, default=4, help="how many photos to drop (default: %(default)s)")
    demo.add_argument("--latency", type=float, default=1.0, help="emulated processing seconds per photo")
    demo.add_argument("--dashboard", nargs="?", const="127.0.0.1:8090", default=None, metavar="HOST:PORT",
                      help="keep the daemon and its dashboard (default %(const)s) up after the demo, until Ctrl-C")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as exc:
        return _error(str(exc), exc.code)


if __name__ == "__main__":
    sys.exit(main())
