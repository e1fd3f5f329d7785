"""`codeformer-daemon demo`: the whole pipeline on this machine, with no key, network or config file.

It starts the gateway emulator and the daemon (built-in host) on loopback, drops a few generated
photo-like scans into an inbox the way a scanner would, waits for the restored files and prints them.
The emulator does not restore faces: each "restored" file is the scan resized by `upscale`, with
the contrast of its middle raised, standing in for restored faces.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageFilter

from .config import Secret, config_from_mapping
from .emulator import GatewayEmulator
from .output.encode import EXTENSIONS
from .output.metadata import choose_format


class DemoError(Exception):
    """The demo cannot run as asked (its folder is not empty, ...)."""


def make_photo(path: Path, width: int = 320, height: int = 400, seed: int = 0, format: str | None = None) -> Path:
    """Write a small old-photo-like portrait (sepia, a face, film grain) to `path`."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    top, bottom = rng.randint(150, 200), rng.randint(60, 110)
    for y in range(height):  # a vertical studio-backdrop gradient
        shade = int(top + (bottom - top) * y / height)
        draw.line([(0, y), (width, y)], fill=(shade, int(shade * 0.9), int(shade * 0.75)))
    cx, cy = width // 2 + rng.randint(-width // 10, width // 10), int(height * 0.42)
    fw, fh = int(width * 0.28), int(height * 0.27)
    draw.ellipse([cx - fw - 30, cy + fh - 10, cx + fw + 30, height + 40], fill=(60, 50, 40))  # shoulders
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=(205, 170, 140))  # face
    draw.chord([cx - fw - 4, cy - fh - 14, cx + fw + 4, cy + fh // 2], 180, 360, fill=(50, 35, 25))  # hair
    for side in (-1, 1):  # eyes
        ex = cx + side * fw // 2
        draw.ellipse([ex - 9, cy - 10, ex + 9, cy + 2], fill=(240, 235, 225))
        draw.ellipse([ex - 4, cy - 8, ex + 4, cy], fill=(40, 30, 25))
    draw.line([(cx, cy), (cx - 5, cy + fh // 3)], fill=(150, 110, 90), width=3)  # nose
    draw.arc([cx - fw // 2, cy + fh // 4, cx + fw // 2, cy + fh // 2 + 10], 20, 160, fill=(130, 60, 55), width=4)
    image = image.filter(ImageFilter.GaussianBlur(1.2))  # an old lens
    grain = Image.effect_noise((width, height), 40).convert("RGB")
    image = Image.blend(image, grain, 0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format)
    return path


def drop_like_a_scanner(final: Path, seed: int, width: int = 320, height: int = 400) -> Path:
    """Write under a temporary name beside the target, then rename: what scanning software does."""
    temp = final.with_name(final.name + ".part")
    make_photo(temp, width, height, seed=seed, format=SCAN_FORMATS[final.suffix.lower()])
    os.replace(temp, final)
    return final


SCAN_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}


def output_name(name: str) -> str:
    """Where the outbox puts the restored `name` with the default output.format (auto: its own family)."""
    path = PurePosixPath(name)
    return str(path.with_suffix(EXTENSIONS[choose_format("auto", SCAN_FORMATS[path.suffix.lower()])]))


DEMO_FILES = ["portrait-1952.jpg", "album 1960s/wedding.png", "album 1960s/grandparents.tif",
              "family/école-1948.jpg", "family/picnic.png", "family/uncle.tif"]


def run_demo(directory: str | os.PathLike, count: int = 4, latency: float = 1.0, timeout: float = 120.0,
             dashboard: str | None = None) -> int:
    """Restore `count` generated scans; with `dashboard` (a listen address), keep the daemon and its
    dashboard up afterwards until Ctrl-C, so a newcomer can look around."""
    from . import logging as daemon_logging
    from .service import Service

    root = Path(directory).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DemoError(f"--dir {root} already exists and is not empty; pick a new folder or remove it")
    folders = {name: root / name for name in ("inbox", "outbox", "archive", "failed", "state")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    daemon_logging.configure("console" if sys.stderr.isatty() else "json", "info")

    with GatewayEmulator(latency=latency, max_concurrent=4) as emulator:
        config = config_from_mapping({
            "folders": {k: str(folders[k]) for k in ("inbox", "outbox", "archive", "failed")},
            "state_dir": str(folders["state"]),
            "api": {"base_url": emulator.base_url, "status_url": emulator.status_url,
                    "poll_interval": 0.25, "max_in_flight": 4, "job_timeout": 120},
            "hosting": {"adapter": "builtin", "builtin": {"listen": "127.0.0.1:0"}},
            "watch": {"settle_seconds": 0.5, "rescan_seconds": 10},
            "dashboard": {"listen": dashboard},
        }, root)
        service = Service(config, Secret(emulator.api_key))
        service.start()
        finished: list[bool] = []
        runner = threading.Thread(target=lambda: finished.append(service.run()), name="daemon", daemon=True)
        runner.start()
        names = [DEMO_FILES[i % len(DEMO_FILES)] if i < len(DEMO_FILES) else f"extra/scan-{i}.jpg"
                 for i in range(count)]
        for i, name in enumerate(names):
            drop_like_a_scanner(folders["inbox"] / name, seed=i)
        expected = {folders["outbox"] / output_name(name) for name in names}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(p.exists() for p in expected):
            if _failed_records(folders["failed"]):
                break
            time.sleep(0.2)
        time.sleep(0.3)  # let the last archive moves land before stopping
        restored = sorted(p for p in expected if p.exists())
        if service.dashboard is not None:
            try:  # a Ctrl-C the moment the line is read must find the handler in place
                _print_results(root, names, restored, folders["failed"])
                print(f"\nThe dashboard is at {service.dashboard.url}/ ; Ctrl-C ends the demo.", flush=True)
                while runner.is_alive():
                    runner.join(0.5)
            except KeyboardInterrupt:
                pass
        service.stop()
        runner.join(timeout=30)
    if service.dashboard is None:
        _print_results(root, names, restored, folders["failed"])
    code = 0 if len(restored) == len(names) else 1
    if finished != [True]:
        # A stage outlived the stop (see `cmd_run`): exiting normally would wait for its thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _print_results(root: Path, names: list[str], restored: list[Path], failed: Path) -> None:
    print(f"\nRestored {len(restored)} of {len(names)} scans (emulator: resized by upscale, contrast raised in the "
          "middle, no real restoration; each labelled as an AI restoration in its XMP):")
    for path in restored:
        with Image.open(path) as image:
            size = f"{image.width}x{image.height}"
        print(f"  {path}  {path.stat().st_size} bytes, {size}")
    for record in _failed_records(failed):
        print(f"  FAILED: {record}")
    print(f"\nFolders left for you to look at: {root}", flush=True)


def _failed_records(failed: Path) -> list[Path]:
    return sorted(failed.rglob("*.error.json"))
