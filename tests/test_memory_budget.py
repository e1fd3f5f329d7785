"""Bounded memory: full-size decodes wait for a byte budget, and memory goes back to the OS afterwards.

The budget's decision is a table; its waiting is shown with real threads and events; that preflight
and the output pipeline really take it is observed through the budget's own hook (two decodes that
never overlap), never by replacing our functions.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from PIL import Image, ImageChops

from daemon import memory
from daemon.config import ConfigError, OutputConfig, PreflightConfig, config_from_mapping
from daemon.demo import make_photo
from daemon.emulator import render_output
from daemon.memory import DecodeBudget, may_start
from daemon.output.guard import restore_tone
from daemon.output.pipeline import BadResult, Origin, rendered
from daemon.preflight import PreflightError, check_image

from .conftest import config_mapping, wait_for

ROOT = Path(__file__).resolve().parent.parent
MIB = memory.MIB
SETTLE = 5.0
"""Seconds an Event may take to arrive before the test gives up (only reached when a behaviour is broken)."""


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("need, held, holders, capacity, first, starts", [
    (100, 0, 0, 256, True, True),        # fits an empty budget
    (100, 100, 1, 256, True, True),      # fits beside another decode
    (156, 100, 1, 256, True, True),      # fills it exactly
    (157, 100, 1, 256, True, False),     # one byte too many: waits
    (1000, 0, 0, 256, True, True),       # larger than the whole budget, nothing held: runs alone
    (1000, 10, 1, 256, True, False),     # larger than the budget while another decodes: waits
    (1, 0, 0, 256, False, False),        # someone asked first: waits its turn, even though it fits
])
def test_the_budget_decides_by_bytes_held_and_order(need, held, holders, capacity, first, starts):
    assert may_start(need, held, holders, capacity, first) is starts


class Recorder:
    """The budget's hook, turned into events a test can wait for, and how many held it at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, int]] = []
        self.holding = 0
        self.most_at_once = 0
        self.waiting = threading.Event()
        self.granted = threading.Event()

    def __call__(self, event: str, need: int) -> None:
        with self.lock:
            self.seen.append((event, need))
            if event == "granted":
                self.holding += 1
                self.most_at_once = max(self.most_at_once, self.holding)
            elif event == "released":
                self.holding -= 1
        {"waiting": self.waiting, "granted": self.granted}.get(event, threading.Event()).set()

    def needs(self, event: str) -> list[int]:
        with self.lock:
            return [need for name, need in self.seen if name == event]


class Holder:
    """A thread that holds `need` bytes of `budget` until told to let go."""

    def __init__(self, budget: DecodeBudget, need: int) -> None:
        self.entered = threading.Event()
        self.let_go = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(budget, need), daemon=True)
        self.thread.start()

    def _run(self, budget: DecodeBudget, need: int) -> None:
        with budget.hold(need, "test"):
            self.entered.set()
            self.let_go.wait(SETTLE * 4)

    def finish(self) -> None:
        self.let_go.set()
        self.thread.join(SETTLE)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("holding, asking, capacity, waits", [
    ([], 100, 256, False),               # fits
    ([100], 100, 256, False),            # fits beside
    ([200], 100, 256, True),             # waits
    ([], 1000, 256, False),              # oversized, alone: runs
    ([10], 1000, 256, True),             # oversized, not alone: waits
    ([100, 100], 100, 256, True),        # two holders: waits until both are gone
])
def test_a_decode_waits_exactly_when_it_does_not_fit_and_a_release_wakes_it(holding, asking, capacity, waits):
    recorder = Recorder()
    budget = DecodeBudget(capacity, give_back=lambda: True)
    holders = [Holder(budget, need) for need in holding]
    for holder in holders:
        assert holder.entered.wait(SETTLE)
    budget.listener = recorder
    asker = Holder(budget, asking)
    assert recorder.waiting.wait(SETTLE) if waits else asker.entered.wait(SETTLE)
    assert asker.entered.is_set() is not waits
    for holder in holders:
        holder.finish()
    assert asker.entered.wait(SETTLE), "a release wakes the waiting decode"
    asker.finish()
    assert (budget.held, budget.holders) == (0, 0)
    assert budget.waits == (1 if waits else 0)


def test_a_large_decode_is_not_overtaken_by_smaller_ones_that_would_fit():
    budget = DecodeBudget(256, give_back=lambda: True)
    first = Holder(budget, 100)
    assert first.entered.wait(SETTLE)
    recorder = Recorder()
    budget.listener = recorder
    large = Holder(budget, 200)
    assert recorder.waiting.wait(SETTLE)
    recorder.waiting.clear()
    small = Holder(budget, 50)  # 100 + 50 fits, but the large one asked first
    assert recorder.waiting.wait(SETTLE)
    assert not small.entered.is_set() and not large.entered.is_set()
    first.finish()
    assert large.entered.wait(SETTLE) and small.entered.wait(SETTLE)  # 200 + 50 fit together
    large.finish()
    small.finish()


def test_a_second_decode_waits_while_the_first_holds_the_budget_and_goes_when_it_is_released():
    budget = DecodeBudget(100 * MIB, give_back=lambda: True)
    recorder = Recorder()
    budget.listener = recorder
    with structlog.testing.capture_logs() as logs:
        first = Holder(budget, 80 * MIB)
        assert first.entered.wait(SETTLE)
        second = Holder(budget, 60 * MIB)
        assert recorder.waiting.wait(SETTLE)
        assert not second.entered.is_set() and budget.holders == 1
        first.finish()
        assert second.entered.wait(SETTLE)
        second.finish()
    waiting = [e for e in logs if e["event"] == "memory.waiting"]
    assert len(waiting) == 1
    assert waiting[0]["need_mb"] == 60 and waiting[0]["held_mb"] == 80 and waiting[0]["budget_mb"] == 100


def thread_cpu_seconds(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_waiting_decode_sleeps_instead_of_spinning():
    budget = DecodeBudget(100, give_back=lambda: True)
    recorder = Recorder()
    first = Holder(budget, 100)
    assert first.entered.wait(SETTLE)
    budget.listener = recorder
    second = Holder(budget, 100)
    assert recorder.waiting.wait(SETTLE)
    tid = second.thread.native_id
    before, started = thread_cpu_seconds(tid), time.monotonic()
    time.sleep(0.5)  # the measurement itself: a spinning waiter burns about this much CPU meanwhile
    spent = thread_cpu_seconds(tid) - before
    first.finish()
    second.finish()
    assert time.monotonic() - started >= 0.5 and spent <= 0.05, f"the waiting thread used {spent:.2f} s of CPU"


# --------------------------------------------------------------------------- memory back to the OS


def test_memory_goes_back_to_the_os_when_the_last_holder_leaves_and_not_before():
    budget = DecodeBudget(256)  # the real give-back: glibc's malloc_trim
    calls = memory.trim_calls
    first, second = Holder(budget, 100), Holder(budget, 100)
    assert first.entered.wait(SETTLE) and second.entered.wait(SETTLE)
    first.finish()
    assert budget.trims == 0 and memory.trim_calls == calls, "another decode still holds the budget"
    recorder = Recorder()
    budget.listener = recorder
    third = Holder(budget, 200)  # waits for the second
    assert recorder.waiting.wait(SETTLE)
    second.finish()
    assert third.entered.wait(SETTLE)
    assert budget.trims == 0, "a decode was waiting to start: nothing to give back yet"
    third.finish()
    assert budget.trims == 1
    if memory._malloc_trim is not None:  # glibc: the call really happened
        assert memory.trim_calls == calls + 1


def test_malloc_trim_is_found_in_glibc():
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("not glibc")
    assert memory.release_memory_to_os() is True


LARGE_BLOCK_PROBE = """
import ctypes, sys
from daemon import memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "configured":
    memory.configure(256)
big = bytearray(24 * 1024 * 1024)  # freed: glibc's own threshold would grow to 24 MiB
del big
before = libc.mallinfo2().hblks
block = bytearray(8 * 1024 * 1024)
print(libc.mallinfo2().hblks - before)  # 1: the 8 MiB block has pages of its own, given back when freed
"""


def large_blocks_mapped(how: str) -> int:
    """In a fresh interpreter: how many new mmapped blocks one 8 MiB allocation made after a 24 MiB free."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", LARGE_BLOCK_PROBE, how], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_large_blocks_stay_out_of_the_malloc_heap_once_the_daemon_configures_its_memory():
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("glibc's mallopt and mallinfo2 only")
    assert large_blocks_mapped("glibc-default") == 0, "the probe shows glibc's growing threshold"
    assert large_blocks_mapped("configured") == 1


# --------------------------------------------------------------------------- preflight and the pipeline take it


@pytest.fixture
def tiny_budget() -> Iterator[Recorder]:
    """The process-wide budget at one byte (every decode runs alone), its hook recording."""
    budget = memory.BUDGET
    if budget.holders or budget.held:  # left held by a test before: fail here rather than wait for ever
        pytest.fail(f"the process budget is still held ({budget.holders} holders, {budget.held} bytes)")
    capacity = budget.capacity
    recorder = Recorder()
    budget.resize(1)
    budget.listener = recorder
    try:
        yield recorder
    finally:
        budget.listener = None
        budget.resize(capacity)


def grey_16_bit(path: Path, size: tuple[int, int] = (600, 400)) -> Path:
    with Image.open(make_photo(path.with_suffix(".src.png"), *size, seed=3)) as photo:
        grey = photo.convert("L")
    Image.frombytes("I;16", size, Image.merge("LA", (grey, grey)).tobytes()).save(path, format="TIFF")
    return path


def run_in_two_threads(first_granted_waits_for: Recorder, work_a, work_b) -> None:
    """Run both; the first to be granted the budget keeps it until the other has asked (or SETTLE passed)."""
    errors: list[BaseException] = []
    hold_on = threading.Event()
    original = first_granted_waits_for.__call__

    def keep_first(event: str, need: int) -> None:
        original(event, need)
        if event == "granted" and not hold_on.is_set():
            hold_on.set()
            first_granted_waits_for.waiting.wait(SETTLE)  # a broken budget lets the other in meanwhile

    memory.BUDGET.listener = keep_first

    def run(work) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in (work_a, work_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SETTLE * 6)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_two_conversions_in_preflight_never_decode_at_once(tmp_path, tiny_budget):
    scans = [grey_16_bit(tmp_path / f"scan-{i}.tif") for i in range(2)]
    results = []
    run_in_two_threads(tiny_budget, *[
        (lambda i=i: results.append(check_image(scans[i], tmp_path / "staging", f"job-{i}", max_pixels=10**7)))
        for i in range(2)])
    assert len(results) == 2 and all(r.converted for r in results)
    assert tiny_budget.needs("granted") == [600 * 400 * 3] * 2, "16-bit grey + its 8-bit copy, from the header"
    assert tiny_budget.most_at_once == 1 and tiny_budget.needs("waiting"), "the second waited for the first"
    assert (memory.BUDGET.held, memory.BUDGET.holders) == (0, 0)


def test_a_jpeg_sent_as_it_is_is_checked_at_an_eighth_of_its_size(tmp_path, tiny_budget):
    scan = make_photo(tmp_path / "scan.jpg", 800, 600, seed=1, format="JPEG")
    checked = check_image(scan, tmp_path / "staging", "job", max_pixels=10**7)
    assert not checked.converted and (checked.width, checked.height) == (800, 600)
    assert tiny_budget.needs("granted") == [100 * 75 * 4]


def test_a_progressive_jpeg_counts_the_coefficients_libjpeg_keeps_at_full_size(tmp_path, tiny_budget):
    with Image.open(make_photo(tmp_path / "photo.png", 800, 600, seed=4)) as photo:
        photo.save(tmp_path / "scan.jpg", format="JPEG", progressive=True)
    check_image(tmp_path / "scan.jpg", tmp_path / "staging", "job", max_pixels=10**7)
    assert tiny_budget.needs("granted") == [100 * 75 * 4 + 800 * 600 * 6]


def test_a_truncated_jpeg_still_fails_its_drafted_check_and_gives_the_budget_back(tmp_path, tiny_budget):
    good = make_photo(tmp_path / "good.jpg", 800, 600, seed=2, format="JPEG").read_bytes()
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(PreflightError, match="truncated"):
        check_image(truncated, tmp_path / "staging", "job", max_pixels=10**7)
    assert tiny_budget.needs("released") == tiny_budget.needs("granted") == [100 * 75 * 4]
    assert (memory.BUDGET.held, memory.BUDGET.holders) == (0, 0)


def test_the_upload_png_is_written_with_the_fastest_compression(tmp_path):
    checked = check_image(grey_16_bit(tmp_path / "scan.tif"), tmp_path / "staging", "job", max_pixels=10**7)
    data = checked.upload_path.read_bytes()
    idat = data.index(b"IDAT") + 4
    flags = data[idat + 1]  # the zlib stream's FLG byte: FLEVEL in its top two bits, 0 = fastest
    assert flags >> 6 == 0, f"zlib level class {flags >> 6}"


def result_for(scan: Path, tmp_path: Path, name: str, outcome: str = "restored") -> Path:
    with Image.open(scan) as image:
        image.load()
        path = tmp_path / name
        path.write_bytes(render_output(image, 1, outcome))
    return path


def test_two_renderings_never_decode_at_once_and_hold_the_budget_until_encoded(tmp_path, tiny_budget):
    out = tmp_path / "out"
    jobs = []
    for i in range(2):
        scan = make_photo(tmp_path / f"scan-{i}.jpg", 640, 480, seed=10 + i, format="JPEG")
        jobs.append((result_for(scan, tmp_path, f"result-{i}.png"), Origin(scan, "0" * 64, f"r{i}", {"upscale": 1})))
    made: list[int] = []

    def render(i: int) -> None:
        with rendered(jobs[i][0], out, jobs[i][1], OutputConfig(), 10**7) as (path, _):
            made.append(path.stat().st_size)

    run_in_two_threads(tiny_budget, lambda: render(0), lambda: render(1))
    assert len(made) == 2 and all(made)
    assert len(tiny_budget.needs("granted")) == 2 and tiny_budget.most_at_once == 1
    assert tiny_budget.needs("waiting"), "the second rendering waited for the first"
    # the RGB result (4 bytes a pixel, its tone restored in place, encoded as JPEG straight from it) and
    # the working strips and buffers (1): estimated from the headers, before a pixel is decoded
    assert tiny_budget.needs("granted") == [640 * 480 * 5] * 2


def test_a_rendering_holds_the_budget_until_its_output_is_encoded(tmp_path, tiny_budget):
    scan = make_photo(tmp_path / "scan.jpg", 320, 240, seed=6, format="JPEG")
    result, out = result_for(scan, tmp_path, "result.png"), tmp_path / "out"
    written_at_release: list[list[int]] = []
    record = tiny_budget.__call__

    def listener(event: str, need: int) -> None:
        record(event, need)
        if event == "released":
            written_at_release.append([p.stat().st_size for p in out.iterdir()])

    memory.BUDGET.listener = listener
    with rendered(result, out, Origin(scan, "0" * 64, "r", {"upscale": 1}), OutputConfig(), 10**7) as (path, _):
        assert tiny_budget.needs("released") == tiny_budget.needs("granted"), "given back before it is yielded"
        assert written_at_release == [[path.stat().st_size]] and path.stat().st_size > 0


def test_a_rendering_that_fails_gives_the_budget_back(tmp_path, tiny_budget):
    scan = make_photo(tmp_path / "scan.jpg", 320, 240, seed=5, format="JPEG")
    blank = result_for(scan, tmp_path, "blank.png", "blank")
    with pytest.raises(BadResult) as refused:
        with rendered(blank, tmp_path / "out", Origin(scan, "0" * 64, "r", {"upscale": 1}), OutputConfig(), 10**7):
            pass
    assert refused.value.kind == "blank_result"
    assert len(tiny_budget.needs("granted")) == 1 and tiny_budget.needs("released") == tiny_budget.needs("granted")
    assert (memory.BUDGET.held, memory.BUDGET.holders) == (0, 0)


def test_the_guard_restores_a_tone_over_the_result_itself_with_the_same_pixels(tmp_path):
    with Image.open(make_photo(tmp_path / "sepia.png", 300, 400, seed=8)) as scan:
        scan.load()
    result = Image.open(io.BytesIO(render_output(scan, 2, "tinted")))
    result.load()
    fresh = restore_tone(scan, result, "toned")
    own = result.copy()
    restored = restore_tone(scan, own, "toned", in_place=True)
    assert restored is own, "no second full-size image"
    assert ImageChops.difference(restored, fresh).getbbox() is None
    grey = result.convert("L")
    coloured = restore_tone(scan, grey, "toned", in_place=True)  # RGB from L: the result cannot take it
    assert coloured is not grey and coloured.mode == "RGB" and grey.mode == "L"


# --------------------------------------------------------------------------- configuration and units


def test_max_decode_mb_defaults_to_the_budget_the_module_starts_with():
    assert PreflightConfig().max_decode_mb == memory.DEFAULT_MAX_DECODE_MB == 256


@pytest.mark.parametrize("value, message", [
    (0, r"preflight\.max_decode_mb: 0 is out of range, allowed 16 to 1048576"),
    (10**7, r"preflight\.max_decode_mb: 10000000 is out of range"),
    ("256MB", r"preflight\.max_decode_mb: expected a whole number, got '256MB'"),
    (0.5, r"preflight\.max_decode_mb: expected a whole number"),
])
def test_a_bad_max_decode_mb_is_refused_with_the_key_named(folders, emulator, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(config_mapping(folders, emulator, preflight={"max_decode_mb": value}), folders["inbox"].parent)


def test_the_running_daemon_sizes_the_process_budget_from_its_configuration(make_config, run_daemon):
    capacity = memory.BUDGET.capacity
    try:
        run_daemon(make_config(preflight={"max_decode_mb": 64}))
        wait_for(lambda: memory.BUDGET.capacity == 64 * MIB, 5, what="the budget sized from preflight.max_decode_mb")
    finally:
        memory.BUDGET.resize(capacity)


@pytest.mark.parametrize("unit", sorted((ROOT / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_the_units_run_the_daemon_with_two_malloc_arenas(unit):
    assert re.search(r"^Environment=MALLOC_ARENA_MAX=2$", unit.read_text(encoding="utf-8"), re.MULTILINE)
