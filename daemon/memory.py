"""The decode budget: every full-size decode takes its bytes from one process-wide budget first.

Worker threads each decoding a 30 Mpx scan would hold as many full-size images as there are slots
(api.max_in_flight), so peak memory would grow with slots x scan size. Instead each full decode
(preflight's conversion, the output's decode, guard and encode) first asks this budget for the bytes
it will need, estimated from the image's header, and waits while others hold them. The budget is
`preflight.max_decode_mb`; a decode larger than the whole budget still runs, alone.

Each estimate is pixels x bytes a pixel as Pillow holds it (`pixel_bytes`) x the full-size images
alive at the step's peak: `preflight.decode_need` (the decode, plus the upload copy where the mode
changes) and `output.pipeline.rendering_need` (the result, plus what the guard and the encoder add).
Both were checked against the measured peak RSS of 24-35 Mpx JPEG and 16-bit TIFF scans.

When the last holder leaves, the freed memory is handed back to the operating system (glibc keeps
it in its arenas otherwise, and a scanning station's RSS would stay at its peak for hours), and
large blocks are kept out of the arenas altogether (`MMAP_THRESHOLD`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator

import structlog

log = structlog.get_logger("daemon.memory")

MIB = 1024 * 1024
DEFAULT_MAX_DECODE_MB = 256
"""preflight.max_decode_mb's default: with the daemon's own ~45 MiB and the OS, a 1 GB Raspberry Pi
keeps room to spare; one 35 Mpx scan or result (140 MB as Pillow holds RGB) fits at a time."""

_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
_TWO_BYTE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow holds per pixel of `mode`: 1 for bilevel, grey and palette, 2 for 16-bit grey,
    and 4 for every other mode, since Pillow stores three-band images (RGB, YCbCr) in four bytes."""
    if mode in _ONE_BYTE_MODES:
        return 1
    if mode in _TWO_BYTE_MODES:
        return 2
    return 4


def image_bytes(size: tuple[int, int], mode: str) -> int:
    """The bytes of one decoded image of `size` and `mode`."""
    return size[0] * size[1] * pixel_bytes(mode)


def may_start(need: int, held: int, holders: int, capacity: int, first_in_line: bool) -> bool:
    """Whether a decode needing `need` bytes may start now: the pure decision behind `DecodeBudget`.

    Decodes start in the order they asked (a large one is never overtaken for ever by small ones).
    The first in line starts when its bytes fit beside what is held, or when nothing is held at all:
    a decode larger than the whole budget runs alone rather than never.
    """
    if not first_in_line:
        return False
    return holders == 0 or held + need <= capacity


class DecodeBudget:
    """A counting semaphore in bytes, first come first served, shared by every decoding thread.

    `hold(need)` blocks (in the lock's own wait: no GIL held, no spinning) until `may_start` says
    yes, and gives the bytes back on every way out. The counters observe what the budget did, not
    what callers meant to do.
    """

    def __init__(self, capacity: int, *, give_back: Callable[[], bool] | None = None,
                 listener: Callable[[str, int], None] | None = None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._capacity = capacity
        self._line: collections.deque[object] = collections.deque()
        self._give_back = give_back if give_back is not None else release_memory_to_os
        self.listener = listener
        """Called with ("waiting" | "granted" | "released", need), outside the lock: a hook for tests."""
        self.held = 0
        self.holders = 0
        self.waits = 0
        """Decodes that had to wait for others to finish first."""
        self.trims = 0
        """Times the last holder left and memory was offered back to the operating system."""

    @property
    def capacity(self) -> int:
        return self._capacity

    def resize(self, capacity: int) -> None:
        """A new budget (start-up, reload); waiting decodes are looked at again at once."""
        with self._cond:
            self._capacity = capacity
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, need: int, what: str = "decode") -> Iterator[None]:
        """Hold `need` bytes of the budget for the body of the `with`; `what` names the work in the log."""
        self.acquire(need, what)
        try:
            yield
        finally:
            self.release(need)

    def acquire(self, need: int, what: str = "decode") -> None:
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            started = self._try_start(ticket, need)
            if not started:
                self.waits += 1
                held, holders, capacity = self.held, self.holders, self._capacity
        if not started:
            log.info("memory.waiting", what=what, need_mb=_mb(need), held_mb=_mb(held), holders=holders,
                     budget_mb=_mb(capacity))
            self._tell("waiting", need)
            with self._cond:
                try:
                    while not self._try_start(ticket, need):
                        self._cond.wait()
                except BaseException:  # interrupted while waiting: leave the line, or it blocks everyone behind
                    self._line.remove(ticket)
                    self._cond.notify_all()
                    raise
        self._tell("granted", need)

    def release(self, need: int) -> None:
        with self._cond:
            self.held -= need
            self.holders -= 1
            idle = self.holders == 0 and not self._line
            if idle:
                self.trims += 1
            self._cond.notify_all()
        self._tell("released", need)
        if idle:  # outside the lock: a trim takes milliseconds, and the next decode need not wait for it
            self._give_back()

    def _try_start(self, ticket: object, need: int) -> bool:
        """Under the lock: start `ticket` if `may_start` allows; the next in line is woken to look too."""
        if not may_start(need, self.held, self.holders, self._capacity, self._line[0] is ticket):
            return False
        self._line.popleft()
        self.held += need
        self.holders += 1
        if self._line:
            self._cond.notify_all()  # the one behind may fit beside this one
        return True

    def _tell(self, event: str, need: int) -> None:
        if self.listener is not None:
            self.listener(event, need)


def _mb(size: int) -> float:
    return round(size / MIB, 1)


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A glibc function by name, or None where the C library has none (musl, macOS)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_malloc_trim = _libc_function("malloc_trim", ctypes.c_size_t)
_mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * MIB
"""Allocations this large get pages of their own from the OS, given back the moment they are freed.
glibc's own threshold grows to the size of the largest block freed (up to 32 MiB): after the first
large image, Pillow's 16 MiB blocks land in the malloc arenas, where small objects allocated among
them pin the pages, and some 25 MiB stayed resident after a batch that malloc_trim could not return.
Below 4 MiB (a hash's or download's 1 MiB buffers) the arenas' reuse is kept."""
_trim_lock = threading.Lock()
trim_calls = 0
"""How often malloc_trim was called in this process (tests read it)."""


def release_memory_to_os() -> bool:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`, every arena); True if called.

    Pillow frees a decoded image into glibc's heap, which keeps the pages for reuse: without this,
    RSS after a batch of large scans stays near its peak. A no-op where libc has no malloc_trim.
    """
    global trim_calls
    if _malloc_trim is None:
        return False
    _malloc_trim(0)  # ctypes releases the GIL for the call
    with _trim_lock:
        trim_calls += 1
    return True


def keep_large_blocks_out_of_the_heap() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; True if set. A MALLOC_MMAP_THRESHOLD_ in the
    environment (the administrator's own choice) is left alone, and so is a libc without mallopt."""
    if _mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


BUDGET = DecodeBudget(DEFAULT_MAX_DECODE_MB * MIB)
"""The process's budget; sized from preflight.max_decode_mb when the service starts or reloads."""


def configure(max_decode_mb: int) -> None:
    """Size the process-wide budget from `preflight.max_decode_mb`, and keep large blocks out of the heap."""
    BUDGET.resize(max_decode_mb * MIB)
    keep_large_blocks_out_of_the_heap()
