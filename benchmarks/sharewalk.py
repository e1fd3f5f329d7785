"""Share walk: what watching a big polled inbox costs, most of its files already jobs.

The daemon's own parts run in this process: `daemon.service.Service` is started on a configuration
with `watch.mode: polling` and an inbox of 50,000 small files (in folders of 1,000), its journal
filled beforehand with unfinished jobs for 45,000 of them and 50,000 finished (archived) jobs for
files long gone from the inbox. No loop is run and nothing is submitted: this script calls the
scheduler's watch steps (`watch_inbox`, `take_new_files`) and its nap (`sleep_until_due`) as the
loop does, so whatever the watcher and the journal do per pass is what is measured. It reports:

- the start-up pass (the first rescan), and how long until the 5,000 new files are journalled;
- the polling observer's walks while nothing changes: CPU and wall per walk, read from the CPU clock
  of the observer's own threads (a walk is a burst of their CPU), the time between walks, the share
  of a core they take, and the share one walk per configured polling interval would take; the loop's
  passes meanwhile (main-thread CPU) apart;
- a rescan pass (every `watch.rescan_seconds`): CPU and wall, and its share of a core at that interval.

A local disk answers a stat in microseconds; on a network share each is a round trip, so the wall
times here are a floor. It prints figures; it is not a test. Exit 1 only if a run could not complete.

    .venv/bin/python benchmarks/sharewalk.py [--files 50000] [--seconds 15] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))

from daemon import logging as daemon_logging  # noqa: E402
from daemon.config import Secret, config_from_mapping  # noqa: E402
from daemon.journal import Journal, JobState  # noqa: E402
from daemon.observers import polling_interval  # noqa: E402
from daemon.scheduler import Scheduler  # noqa: E402
from daemon.service import JOURNAL_NAME, Service  # noqa: E402
from throughput import report, station_folders  # noqa: E402

TARGET_CPU_PER_WALK = 0.3
TARGET_SHARE_OF_CORE = 0.10
JOURNAL_TIMEOUT = 300.0
"""Seconds the new files may take to be journalled before the run is given up."""
SAMPLE_SECONDS = 0.01
"""How often the observer's CPU clocks are read."""
WALK_GAP = 0.2
"""CPU bursts closer than this are one walk (walks are at least a polling interval, 0.25 s, apart)."""
IDLE_CPU = 0.0002
"""Less CPU than this in one sample is the thread waiting, not walking."""
NO_PERIODIC_RESCAN = 86_400.0
"""The watcher's own rescan is kept out of the measured window; rescans are run on request."""


class BenchmarkError(Exception):
    """A run could not complete; the message says where it stopped."""


@dataclass
class WalkResult:
    files: int
    with_jobs: int
    archived_jobs: int
    observer: str | None
    polling_interval: float
    """The configured one (from settle_seconds); a walker may wait longer between walks."""
    setup_seconds: float
    startup_pass_cpu_seconds: float
    startup_pass_wall_seconds: float
    new_files_journalled_seconds: float
    """From the start-up pass until the files without a job all had one."""
    walks: int
    """Whole walks seen in the window."""
    walk_cpu_seconds: float | None
    """Median CPU of one walk (the observer's threads)."""
    walk_wall_seconds: float | None
    """Median time from a walk's first CPU to its last."""
    walk_period_seconds: float | None
    """Median time from one walk's start to the next's."""
    walk_share_at_interval: float | None
    """CPU per walk over (polling interval + wall per walk): the share if walked at the configured pace."""
    walk_share_of_core: float
    """The observer's threads' CPU over the window: what the walks took as they were paced."""
    loop_passes: int
    loop_pass_cpu_seconds: float | None
    """Median main-thread CPU of one pass of the watch steps without a rescan."""
    loop_share_of_core: float
    window_seconds: float
    window_share_of_core: float
    """All the process's CPU over the measured window, loop and walks together."""
    rescan_seconds: float
    rescan_cpu_seconds: float
    rescan_wall_seconds: float
    rescan_share_of_core: float
    """A rescan pass's CPU over `rescan_seconds`."""
    share_of_core: float
    """The window's share plus the rescans' share: what watching this inbox costs."""

    @property
    def walk_passed(self) -> bool:
        return self.walk_cpu_seconds is not None and self.walk_cpu_seconds < TARGET_CPU_PER_WALK

    @property
    def share_passed(self) -> bool:
        return self.share_of_core <= TARGET_SHARE_OF_CORE


# --------------------------------------------------------------------------- setting up


def make_inbox(inbox: Path, files: int, per_folder: int) -> list[tuple[str, int, int]]:
    """`files` small files in folders of `per_folder`; (rel_path, size, mtime_ns) of each."""
    made = []
    for i in range(files):
        rel_path = f"box-{i // per_folder:03d}/scan-{i:05d}.jpg"
        path = inbox / rel_path
        if i % per_folder == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(b"\xff\xd8 scan %d \xff\xd9" % i)
        st = path.stat()
        made.append((rel_path, st.st_size, st.st_mtime_ns))
    return made


def fill_journal(path: Path, with_jobs: list[tuple[str, int, int]], archived: int, params: dict[str, Any]) -> None:
    """Unfinished (pending) jobs for `with_jobs`, and `archived` done jobs of files gone from the inbox.

    One transaction: `add_job` joins the outer one, so this is one commit, not one per job.
    """
    journal = Journal(path)
    try:
        with journal.transaction() as cur:
            for i in range(archived):
                journal.add_job(f"done-{i // 1000:03d}/scan-{i:05d}.jpg", 1000, 0, params)
            # The state straight to done: the journey there (7 transitions a job) is not what is measured.
            cur.execute("UPDATE jobs SET state = ?, finished_at = updated_at WHERE id <= ?",
                        (JobState.DONE.value, archived))
            for rel_path, size, mtime_ns in with_jobs:
                journal.add_job(rel_path, size, mtime_ns, params)
    finally:
        journal.close()


def config_for(root: Path, settle: float) -> Any:
    return config_from_mapping({
        **station_folders(root),
        "api": {"base_url": "http://127.0.0.1:9/", "status_url": "http://127.0.0.1:9/status"},  # never called
        "hosting": {"adapter": "builtin", "builtin": {"listen": "127.0.0.1:0"}},
        "watch": {"mode": "polling", "settle_seconds": settle, "rescan_seconds": NO_PERIODIC_RESCAN},
    }, root)


# --------------------------------------------------------------------------- measuring


def watch_steps(scheduler: Scheduler) -> tuple[float, float]:
    """One pass of the loop's watch steps, as `Scheduler.run` calls them; (main-thread CPU, wall)."""
    cpu, wall = time.thread_time(), time.perf_counter()
    scheduler.watch_inbox()
    scheduler.take_new_files()
    return time.thread_time() - cpu, time.perf_counter() - wall


def others_cpu() -> float:
    """CPU seconds of every thread of this process but this one (the observer's, above all)."""
    return time.process_time() - time.thread_time()


def journal_new_files(scheduler: Scheduler, journal: Journal, expected: int) -> float:
    """Run passes, napping as the loop does, until `expected` jobs are unfinished; the seconds it took."""
    started = time.monotonic()
    while journal.count_in(JobState.PENDING) < expected:
        if time.monotonic() - started > JOURNAL_TIMEOUT:
            raise BenchmarkError(f"only {journal.count_in(JobState.PENDING)} of {expected} files journalled "
                                 f"after {JOURNAL_TIMEOUT:g} s")
        scheduler.wake.clear()
        scheduler.sleep_until_due()
        watch_steps(scheduler)
    return time.monotonic() - started


@dataclass(frozen=True)
class Walk:
    start: float
    wall: float
    cpu: float


class CpuSampler(threading.Thread):
    """Reads the CPU clocks of the given threads every SAMPLE_SECONDS: (monotonic time, their CPU sum)."""

    def __init__(self, threads: list[threading.Thread]) -> None:
        super().__init__(name="sharewalk-sampler", daemon=True)
        self.clocks = [time.pthread_getcpuclockid(t.ident) for t in threads]
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.wait(SAMPLE_SECONDS):
                self.samples.append((time.monotonic(), sum(time.clock_gettime(c) for c in self.clocks)))
        except OSError:  # a thread ended (the observer was replaced): what was sampled stands
            return


def walks_in(samples: list[tuple[float, float]]) -> list[Walk]:
    """The whole walks in a run of samples: bursts of CPU, apart by more than WALK_GAP.

    A burst still going at either end of the samples is left out (only part of it was seen).
    """
    bursts: list[list[tuple[float, float, float]]] = []  # (sample interval start, end, cpu in it)
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if c1 - c0 <= IDLE_CPU:
            continue
        if bursts and t0 - bursts[-1][-1][1] <= WALK_GAP:
            bursts[-1].append((t0, t1, c1 - c0))
        else:
            bursts.append([(t0, t1, c1 - c0)])
    if len(samples) < 2:
        return []
    first, last = samples[0][0], samples[-1][0]
    return [Walk(start=b[0][0], wall=b[-1][1] - b[0][0], cpu=sum(c for _, _, c in b)) for b in bursts
            if b[0][0] > first and b[-1][1] < last and last - b[-1][1] > WALK_GAP]


def steady_window(scheduler: Scheduler, observer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Loop as the daemon does while nothing changes, for `args.seconds` and until `args.walks` whole
    walks were seen (at most `args.max_seconds`); the observer's CPU is sampled meanwhile."""
    sampler = CpuSampler(list(observer.emitters) if observer is not None else [])
    loop_cpu: list[float] = []
    process_cpu, started = time.process_time(), time.monotonic()
    sampler.start()
    try:
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= args.seconds and (len(walks_in(sampler.samples)) >= args.walks
                                            or elapsed >= args.max_seconds):
                break
            scheduler.wake.clear()
            scheduler.sleep_until_due()
            loop_cpu.append(watch_steps(scheduler)[0])
    finally:
        sampler.done.set()
        sampler.join()
    window = time.monotonic() - started
    samples = sampler.samples
    walker_cpu = samples[-1][1] - samples[0][1] if len(samples) > 1 else 0.0
    return {"window": window, "window_cpu": time.process_time() - process_cpu, "walks": walks_in(samples),
            "walker_cpu": walker_cpu, "loop_cpu": loop_cpu}


def rescan_pass(scheduler: Scheduler) -> tuple[float, float]:
    """One pass with a rescan due, as the watcher's periodic rescan runs; (main-thread CPU, wall)."""
    scheduler.watcher.request_rescan()
    scheduler.wake.clear()
    return watch_steps(scheduler)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def run(args: argparse.Namespace) -> WalkResult:
    root = Path(tempfile.mkdtemp(prefix="codeformer-sharewalk-"))
    service: Service | None = None
    log_stream = open(root / "daemon.log", "w", encoding="utf-8")
    try:
        daemon_logging.configure("json", "info", stream=log_stream)  # as the daemon logs, into a file
        setup_started = time.monotonic()
        config = config_for(root, args.settle)
        files = make_inbox(config.folders.inbox, args.files, args.per_folder)
        with_jobs = int(args.files * args.with_jobs)
        fill_journal(config.state_dir / JOURNAL_NAME, files[:with_jobs], args.archived,
                     config.restore.as_request())
        setup = time.monotonic() - setup_started

        service = Service(config, Secret("sharewalk-benchmark-key"))
        service.start()
        scheduler, journal = service.scheduler, service.journal
        assert scheduler is not None and journal is not None
        first_cpu, first_wall = watch_steps(scheduler)  # the start-up rescan
        journalled = journal_new_files(scheduler, journal, args.files)
        window = steady_window(scheduler, service.watcher.observer, args)
        rescans = [rescan_pass(scheduler) for _ in range(args.rescans)]
        interval = polling_interval(args.settle)

        walks = window["walks"]
        walk_cpu, walk_wall = _median([w.cpu for w in walks]), _median([w.wall for w in walks])
        walk_period = _median([b.start - a.start for a, b in zip(walks, walks[1:])])
        loop_share = sum(window["loop_cpu"]) / window["window"]
        window_share = window["window_cpu"] / window["window"]
        rescan_cpu = statistics.median(cpu for cpu, _ in rescans)
        rescan_share = rescan_cpu / args.rescan_seconds
        return WalkResult(
            files=args.files, with_jobs=with_jobs, archived_jobs=args.archived,
            observer=service.watcher.observer_kind, polling_interval=interval, setup_seconds=round(setup, 1),
            startup_pass_cpu_seconds=round(first_cpu, 4), startup_pass_wall_seconds=round(first_wall, 4),
            new_files_journalled_seconds=round(journalled, 3), walks=len(walks),
            walk_cpu_seconds=_round(walk_cpu), walk_wall_seconds=_round(walk_wall),
            walk_period_seconds=_round(walk_period),
            walk_share_at_interval=_round(None if walk_cpu is None else walk_cpu / (interval + walk_wall)),
            walk_share_of_core=round(window["walker_cpu"] / window["window"], 4), loop_passes=len(window["loop_cpu"]),
            loop_pass_cpu_seconds=_round(_median(window["loop_cpu"][1:])),  # the first follows the set-up
            loop_share_of_core=round(loop_share, 4), window_seconds=round(window["window"], 2),
            window_share_of_core=round(window_share, 4), rescan_seconds=args.rescan_seconds,
            rescan_cpu_seconds=round(rescan_cpu, 4),
            rescan_wall_seconds=round(statistics.median(wall for _, wall in rescans), 4),
            rescan_share_of_core=round(rescan_share, 4), share_of_core=round(window_share + rescan_share, 4),
        )
    finally:
        if service is not None:
            stop_parts(service)
        log_stream.close()
        shutil.rmtree(root, ignore_errors=True)


def stop_parts(service: Service) -> None:
    """What `Service.run` would stop on its way out (its loop never ran here)."""
    if service.watcher is not None:
        service.watcher.stop()
    service.host.stop()
    if service.scheduler is not None:
        service.scheduler.pool.shutdown(wait=False)
        service.scheduler.ctx.api.close()
    if service.journal is not None:
        service.journal.close()


# --------------------------------------------------------------------------- reporting


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _s(value: float | None, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%} of a core"


def render(r: WalkResult) -> str:
    rows = [
        ("inbox", f"{r.files} files ({r.with_jobs} with unfinished jobs); {r.archived_jobs} archived jobs"),
        ("observer", f"{r.observer}, polling interval {_s(r.polling_interval, digits=2)}"),
        ("set-up (not measured)", f"{r.setup_seconds:.1f} s"),
        ("start-up pass (first rescan)",
         f"CPU {_s(r.startup_pass_cpu_seconds)}, wall {_s(r.startup_pass_wall_seconds)}"),
        ("new files all journalled", f"{r.new_files_journalled_seconds:.2f} s after it"),
        ("observer walks, nothing changing", f"{r.walks} whole walks in {r.window_seconds:.1f} s"),
        ("  CPU per walk", _s(r.walk_cpu_seconds)
         + f"  (target < {TARGET_CPU_PER_WALK:g} s: {_verdict(r.walk_passed)})"),
        ("  wall per walk", _s(r.walk_wall_seconds)),
        ("  walk start to walk start", _s(r.walk_period_seconds)),
        ("  share, as paced", _pct(r.walk_share_of_core)),
        ("  share, at the polling interval", _pct(r.walk_share_at_interval)),
        ("loop passes (watch steps)", f"{r.loop_passes}, CPU per pass {_s(r.loop_pass_cpu_seconds)}, "
                                      f"{_pct(r.loop_share_of_core)}"),
        ("whole window", _pct(r.window_share_of_core)),
        ("rescan pass", f"CPU {_s(r.rescan_cpu_seconds)}, wall {_s(r.rescan_wall_seconds)}; every "
                        f"{r.rescan_seconds:g} s: {_pct(r.rescan_share_of_core)}"),
        ("watching this inbox", _pct(r.share_of_core)
         + f"  (target <= {TARGET_SHARE_OF_CORE:.0%}: {_verdict(r.share_passed)})"),
    ]
    return "\n".join(f"  {name:<36}{value}".rstrip() for name, value in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000, help="files in the inbox (default %(default)s)")
    parser.add_argument("--per-folder", type=int, default=1000, help="files per folder (default %(default)s)")
    parser.add_argument("--with-jobs", type=float, default=0.9,
                        help="share of the files that already have an unfinished job (default %(default)s)")
    parser.add_argument("--archived", type=int, default=50_000,
                        help="finished jobs in the journal, their files gone (default %(default)s)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="watch.settle_seconds; the polling interval follows it (default %(default)s)")
    parser.add_argument("--rescan-seconds", type=float, default=60.0,
                        help="watch.rescan_seconds the rescan's share is reckoned at (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="the measured window, at least (default %(default)s)")
    parser.add_argument("--walks", type=int, default=3,
                        help="whole walks to see, stretching the window up to --max-seconds (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="the longest the window is stretched (a paced walker waits long; default %(default)s)")
    parser.add_argument("--rescans", type=int, default=3, help="rescan passes timed, median (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.files < 1 or args.per_folder < 1 or args.rescans < 1 or args.walks < 0 or args.archived < 0:
        parser.error("--files, --per-folder and --rescans must be at least 1, --walks and --archived not negative")
    if not 0 <= args.with_jobs <= 1 or args.seconds <= 0 or args.rescan_seconds <= 0:
        parser.error("--with-jobs must be 0 to 1, --seconds and --rescan-seconds positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result, error = run(args), None
    except BenchmarkError as exc:
        result, error = None, f"the run could not complete: {exc}"
    settings = {"files": args.files, "per_folder": args.per_folder, "with_jobs": args.with_jobs,
                "archived": args.archived, "settle_seconds": args.settle,
                "rescan_seconds": args.rescan_seconds, "seconds": args.seconds, "walks": args.walks,
                "rescans": args.rescans,
                "target_cpu_per_walk_seconds": TARGET_CPU_PER_WALK,
                "target_share_of_core": TARGET_SHARE_OF_CORE}
    result_json = None if result is None else {**asdict(result), "walk_passed": result.walk_passed,
                                               "share_passed": result.share_passed}
    return report(args.json, settings, result_json, None if result is None else render(result), error)


if __name__ == "__main__":
    sys.exit(main())
