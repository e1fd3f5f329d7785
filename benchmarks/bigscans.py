"""Big scans: the daemon's memory with four archive-size scans (24-35 Mpx) in flight at once.

A real daemon process (its memory is its own, read from /proc/PID/status) watches an inbox, against
the gateway emulator running in this process; everything stays on 127.0.0.1. Four scans are renamed
into the inbox at once: two photo-like JPEGs (24 and 35 Mpx) and two 16-bit TIFFs (27 Mpx 48-bit
colour, 35 Mpx 16-bit grey), with api.max_in_flight 4, restore.upscale 1 and output.format auto
(JPEG back as JPEG, TIFF as TIFF). Each scan is made with Pillow from a small generated photo,
enlarged, with grain added so the JPEGs compress like real scans.

Reported: peak RSS (VmHWM) over the batch, RSS once the daemon has been idle a few seconds after it
(VmRSS), the daemon's CPU per file from the drop, the wall time from the drop to the last output,
and how often a decode waited for the budget (`memory.waiting`). It prints figures; it is not a test.
Exit 1 only if a run could not complete.

`--compare` runs twice, side by side: unbounded (preflight.max_decode_mb at its ceiling, glibc's
default malloc arenas: every decode at once, as before the budget) and bounded (the default budget,
MALLOC_ARENA_MAX=2 as the systemd units set it). The scheduler runs cores - 1 deliveries at once, so
on a 2-core machine decodes overlap little; `--cores 4` makes the daemon size its concurrency as on
a 4-core station (a Raspberry Pi 4 or 5) while running on the cores there are.

    .venv/bin/python benchmarks/bigscans.py [--compare] [--cores N] [--max-decode-mb N] [--arenas N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script from a checkout, not only when installed
    sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon.demo import make_photo  # noqa: E402
from daemon.emulator import GatewayEmulator  # noqa: E402
# The daemon-process helpers of the throughput benchmark, beside this file.
from throughput import (LOOPBACK, BenchmarkError, cpu_seconds, free_port, log_tail, loopback_only_env,  # noqa: E402
                        peak_rss_mib, read_log, station_folders, stop_daemon, wait_for_ready)

SCANS = (
    ("scan-1.jpg", (7000, 5000), "jpeg"),
    ("scan-2.jpg", (6000, 4000), "jpeg"),
    ("scan-3.tif", (6000, 4500), "rgb48"),
    ("scan-4.tif", (6800, 5100), "grey16"),
)
"""Name, size and kind of each scan: 35.0, 24.0, 27.0 and 34.7 Mpx."""
TARGET_PEAK_MIB = 300
TARGET_AFTER_MIB = 60
UNBOUNDED_MB = 1_048_576
"""preflight.max_decode_mb's ceiling: no decode ever waits."""
MAX_IN_FLIGHT = 4
PROVIDER_SLOTS = 8
LATENCY = 4.0
"""Seconds the emulated provider takes per job (a GPU restores a scan in a few): the JPEGs' results
come back while the TIFFs are still being converted, so their decodes would overlap."""
COMPLETION_TIMEOUT = 600.0
POLL = 0.05
AS_IF_CORES = "import os, sys; os.cpu_count = lambda: {cores}; from daemon.cli import main; sys.exit(main())"
"""The daemon, told it has `cores` CPUs (the scheduler sizes its deliveries at once from that)."""


@dataclass
class RunResult:
    label: str
    cores: int
    max_decode_mb: int | None
    malloc_arena_max: int | None
    files: int
    megapixels: float
    wall_seconds: float
    daemon_cpu_seconds_per_file: float
    peak_rss_mib: float
    rss_after_mib: float
    idle_seconds: float
    decode_waits: int
    daemon_exit_code: int | None

    @property
    def passed(self) -> bool:
        return self.peak_rss_mib <= TARGET_PEAK_MIB and self.rss_after_mib <= TARGET_AFTER_MIB


# --------------------------------------------------------------------------- the scans


def photo_like(size: tuple[int, int], seed: int, work: Path) -> Image.Image:
    """A generated old photo enlarged to `size`, with film grain over it (JPEG then compresses as a scan does)."""
    small = make_photo(work / f"small-{seed}.png", 700, 500, seed=seed, format="PNG")
    with Image.open(small) as image:
        big = image.resize(size, Image.BICUBIC)
    return Image.blend(big, Image.effect_noise(size, 24).convert("RGB"), 0.15)


def write_rgb48_tiff(path: Path, image: Image.Image, rows_per_strip: int = 64) -> None:
    """`image` as an uncompressed 48-bit colour TIFF (Pillow writes none): its 8 bits as each sample's
    high byte, grain as its low byte. Written a strip at a time."""
    width, height = image.size
    strips = -(-height // rows_per_strip)
    counts = [min(rows_per_strip, height - i * rows_per_strip) * width * 6 for i in range(strips)]
    entries = 11
    bits_at = 8 + 2 + entries * 12 + 4
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * strips
    offsets = [counts_at + 4 * strips + sum(counts[:i]) for i in range(strips)]

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag: int, value: int, count: int = 1) -> bytes:
        return struct.pack("<HHII", tag, 4, count, value)

    ifd = b"".join([long(256, width), long(257, height), struct.pack("<HHII", 258, 3, 3, bits_at), short(259, 1),
                    short(262, 2), long(273, offsets_at, strips), short(277, 3), long(278, rows_per_strip),
                    long(279, counts_at, strips), short(284, 1), short(339, 1)])
    grain = Image.effect_noise((width * 3, rows_per_strip), 60)
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", entries) + ifd + struct.pack("<I", 0))
        f.write(struct.pack("<HHH", 16, 16, 16) + struct.pack(f"<{strips}I", *offsets)
                + struct.pack(f"<{strips}I", *counts))
        for i in range(strips):
            rows = image.crop((0, i * rows_per_strip, width, min(height, (i + 1) * rows_per_strip)))
            high = Image.frombytes("L", (width * 3, rows.height), rows.tobytes())
            low = grain if rows.height == rows_per_strip else grain.crop((0, 0, width * 3, rows.height))
            f.write(Image.merge("LA", (low, high)).tobytes())  # little-endian: low byte, then high


def write_grey16_tiff(path: Path, image: Image.Image) -> None:
    grey = image.convert("L")
    raw = Image.merge("LA", (Image.effect_noise(grey.size, 60), grey)).tobytes()  # low byte, high byte
    Image.frombytes("I;16", grey.size, raw).save(path, format="TIFF")


def make_scans(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, size, kind) in enumerate(SCANS, start=1):
        image = photo_like(size, seed, folder)
        path = folder / name
        if kind == "jpeg":
            image.save(path, format="JPEG", quality=90)
        elif kind == "rgb48":
            write_rgb48_tiff(path, image)
        else:
            write_grey16_tiff(path, image)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- one run


def write_config(root: Path, emulator: GatewayEmulator, max_decode_mb: int | None) -> Path:
    config: dict[str, Any] = {
        **station_folders(root),
        "api": {"base_url": emulator.base_url, "status_url": emulator.status_url,
                "max_in_flight": MAX_IN_FLIGHT, "poll_interval": 0.25, "job_timeout": COMPLETION_TIMEOUT},
        "restore": {"upscale": 1},
        "hosting": {"adapter": "builtin", "builtin": {"listen": f"{LOOPBACK}:{free_port()}"}},
        "watch": {"settle_seconds": 0.2, "rescan_seconds": 60},
        "output": {"format": "auto"},
        "logging": {"format": "json", "level": "info"},
    }
    if max_decode_mb is not None:
        config["preflight"] = {"max_decode_mb": max_decode_mb}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start_daemon(config_path: Path, log_path: Path, api_key: str, cores: int) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-c", AS_IF_CORES.format(cores=cores), "run", "--config", str(config_path)],
            cwd=PROJECT_ROOT, env=loopback_only_env(api_key),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError("no VmRSS in /proc status")


def count_files(folder: Path) -> int:
    """Finished files a person would see (sidecars and the daemon's hidden temporaries left out)."""
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".json"))


def wait_until_done(daemon: subprocess.Popen, folders: dict[str, Path], count: int, log_path: Path) -> float:
    """Wait for every output and every archived original; the monotonic time the last output appeared."""
    deadline = time.monotonic() + COMPLETION_TIMEOUT
    last_output: float | None = None
    while True:
        now = time.monotonic()
        if last_output is None and count_files(folders["outbox"]) >= count:
            last_output = now
        if last_output is not None and count_files(folders["archive"]) >= count:
            return last_output
        if now >= deadline:
            raise BenchmarkError(f"{count_files(folders['outbox'])} of {count} outputs after "
                                 f"{COMPLETION_TIMEOUT:g} s:\n" + log_tail(log_path))
        if daemon.poll() is not None:
            raise BenchmarkError(f"the daemon exited with {daemon.returncode}:\n" + log_tail(log_path))
        failures = sorted(folders["failed"].glob("*.error.json"))
        if failures:
            raise BenchmarkError(f"{failures[0].name}: " + failures[0].read_text(encoding="utf-8")[:500])
        time.sleep(POLL)


def run_once(label: str, scans: list[Path], max_decode_mb: int | None, arenas: int | None,
             idle_seconds: float, latency: float = LATENCY, cores: int | None = None) -> RunResult:
    """One measurement with its own emulator, daemon and folders, all removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="codeformer-bigscans-"))
    emulator = GatewayEmulator(f"{LOOPBACK}:0", latency=latency, max_concurrent=PROVIDER_SLOTS)
    daemon: subprocess.Popen | None = None
    saved = os.environ.get("MALLOC_ARENA_MAX")
    try:
        emulator.start()
        config_path = write_config(root, emulator, max_decode_mb)
        folders = {name: root / name for name in ("inbox", "outbox", "archive", "failed")}
        log_path = root / "daemon.log"
        drop = root / "to-drop"
        drop.mkdir()
        for scan in scans:  # hard links: the scans are made once for every run
            os.link(scan, drop / scan.name)
        os.environ.pop("MALLOC_ARENA_MAX", None)
        if arenas:
            os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # the child's environment is copied from ours
        cores = cores or os.cpu_count() or 2
        daemon = start_daemon(config_path, log_path, emulator.api_key, cores)
        wait_for_ready(daemon, log_path)

        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        for scan in scans:
            os.rename(drop / scan.name, folders["inbox"] / scan.name)
        t1 = wait_until_done(daemon, folders, len(scans), log_path)
        cpu = cpu_seconds(daemon.pid) - cpu0
        time.sleep(idle_seconds)
        peak, after = peak_rss_mib(daemon.pid), rss_mib(daemon.pid)
        exit_code, _ = stop_daemon(daemon)
        waits = sum(1 for e in read_log(log_path) if e.get("event") == "memory.waiting")
        return RunResult(
            label=label, cores=cores, max_decode_mb=max_decode_mb, malloc_arena_max=arenas, files=len(scans),
            megapixels=round(sum(w * h for _, (w, h), _ in SCANS) / 1e6, 1), wall_seconds=round(t1 - t0, 2),
            daemon_cpu_seconds_per_file=round(cpu / len(scans), 2), peak_rss_mib=round(peak, 1),
            rss_after_mib=round(after, 1), idle_seconds=idle_seconds, decode_waits=waits,
            daemon_exit_code=exit_code)
    finally:
        if saved is None:
            os.environ.pop("MALLOC_ARENA_MAX", None)
        else:
            os.environ["MALLOC_ARENA_MAX"] = saved
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- reporting


def render(result: RunResult) -> str:
    budget = "default (256)" if result.max_decode_mb is None else str(result.max_decode_mb)
    verdict = "PASS" if result.passed else "FAIL"
    rows = [
        ("cores the daemon sizes itself for", str(result.cores)),
        ("preflight.max_decode_mb", budget),
        ("MALLOC_ARENA_MAX", str(result.malloc_arena_max or "glibc default")),
        ("scans", f"{result.files}, {result.megapixels} Mpx in all"),
        ("wall, drop -> last output", f"{result.wall_seconds:.2f} s"),
        ("daemon CPU per file", f"{result.daemon_cpu_seconds_per_file:.2f} s"),
        ("peak RSS (VmHWM)", f"{result.peak_rss_mib:.0f} MiB  (target <= {TARGET_PEAK_MIB})"),
        (f"RSS after, idle {result.idle_seconds:g} s", f"{result.rss_after_mib:.0f} MiB  (target <= {TARGET_AFTER_MIB})"),
        ("decodes that waited", str(result.decode_waits)),
        ("daemon exit after SIGTERM", str(result.daemon_exit_code)),
        ("targets", verdict),
    ]
    return "\n".join([result.label] + [f"  {name:<35}{value}" for name, value in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="unbounded and bounded runs, side by side")
    parser.add_argument("--max-decode-mb", type=int, default=None,
                        help="preflight.max_decode_mb for a single run (default: the daemon's default)")
    parser.add_argument("--arenas", type=int, default=2,
                        help="MALLOC_ARENA_MAX for a single run, as the units set it; 0: glibc's default")
    parser.add_argument("--latency", type=float, default=LATENCY,
                        help="emulated seconds per job (default %(default)s)")
    parser.add_argument("--cores", type=int, default=None,
                        help="CPUs the daemon believes it has, for its concurrency (default: this machine's)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="idle time after the batch before RSS is read (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        plan = [("unbounded: every decode at once, glibc's default arenas", UNBOUNDED_MB, None),
                ("bounded: the default budget, MALLOC_ARENA_MAX=2", None, 2)]
    else:
        plan = [("one run", args.max_decode_mb, args.arenas or None)]
    work = Path(tempfile.mkdtemp(prefix="codeformer-bigscans-scans-"))
    results: list[RunResult] = []
    error: str | None = None
    try:
        started = time.monotonic()
        scans = make_scans(work)
        if not args.json:
            print(f"made {len(scans)} scans in {time.monotonic() - started:.1f} s: "
                  + ", ".join(f"{name} {w}x{h}" for name, (w, h), _ in SCANS), flush=True)
        for label, budget, arenas in plan:
            try:
                results.append(run_once(label, scans, budget, arenas, args.idle_seconds, args.latency, args.cores))
            except BenchmarkError as exc:
                error = f"{label}: could not complete: {exc}"
                break
            if not args.json:
                print(render(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"targets": {"peak_rss_mib": TARGET_PEAK_MIB, "rss_after_mib": TARGET_AFTER_MIB},
                          "runs": [{**asdict(r), "passed": r.passed} for r in results], "error": error}, indent=2))
    elif error:
        print(f"FAILED: {error}", file=sys.stderr)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
