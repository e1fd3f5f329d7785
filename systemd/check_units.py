#!/usr/bin/env python3
"""Check the systemd units in this folder: hardened enough, and clean for `systemd-analyze verify`.

For every *.service here (a template is checked as an instance, codeformer-daemon@check.service):

- `systemd-analyze security --offline=yes` must report an overall exposure of at most MAX_EXPOSURE;
- `systemd-analyze verify` must print nothing but that the ExecStart binary is not installed here
  (it lives in the station's virtualenv), which it reports even on a clean unit.

Run by .ci/run and by tests/test_systemd.py. Exit 0 when all pass, 1 when one fails, 2 when
systemd-analyze is missing. Standard library only, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MAX_EXPOSURE = 1.5
UNITS_DIR = Path(__file__).resolve().parent
TEMPLATE_INSTANCE = "check"

_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


@dataclass
class UnitReport:
    unit: str
    exposure: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def exposure_of(security_output: str) -> float | None:
    """The overall exposure `systemd-analyze security` printed, or None if it printed none."""
    match = _EXPOSURE.search(security_output)
    return float(match.group(1)) if match else None


def exec_start_binary(unit_text: str) -> str | None:
    """The program of the unit's ExecStart= (its special prefixes such as '-' or '+' removed)."""
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            words = line[len("ExecStart="):].split()
            return words[0].lstrip("-@:+!") if words else None
    return None


def unexpected_verify_lines(verify_output: str, binary: str | None) -> list[str]:
    """Lines of `systemd-analyze verify` other than "ExecStart's binary is not installed here"."""
    unexpected = []
    for line in verify_output.splitlines():
        if not line.strip():
            continue
        about_binary = binary is not None and f"Command {binary} " in line
        if about_binary and ("is not executable" in line or "not installed" in line):
            continue
        unexpected.append(line)
    return unexpected


def _run(analyze: str, *args: str) -> str:
    done = subprocess.run([analyze, *args], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def check_unit(path: Path, analyze: str) -> UnitReport:
    """Both checks for one unit file; a template is copied and checked as an instance of itself."""
    report = UnitReport(path.name)
    text = path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as scratch:
        target = path
        if path.name.endswith("@.service"):
            target = Path(scratch) / path.name.replace("@.service", f"@{TEMPLATE_INSTANCE}.service")
            shutil.copyfile(path, target)
        security = _run(analyze, "security", "--offline=yes", str(target))
        report.exposure = exposure_of(security)
        if report.exposure is None:
            report.problems.append(f"systemd-analyze security printed no exposure:\n{security.strip()}")
        elif report.exposure > MAX_EXPOSURE:
            report.problems.append(f"exposure {report.exposure} is above {MAX_EXPOSURE}; what counts:\n"
                                   + "\n".join(line for line in security.splitlines() if "✗" in line))
        for line in unexpected_verify_lines(_run(analyze, "verify", str(target)), exec_start_binary(text)):
            report.problems.append(f"systemd-analyze verify: {line}")
    return report


def main(argv: list[str]) -> int:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("check-units: systemd-analyze not found (apt-get install systemd)", file=sys.stderr)
        return 2
    units = [Path(a) for a in argv] or sorted(UNITS_DIR.glob("*.service"))
    if not units:
        print(f"check-units: no unit files in {UNITS_DIR}", file=sys.stderr)
        return 1
    failed = False
    for unit in units:
        report = check_unit(unit, analyze)
        print(f"{report.unit}: exposure {report.exposure}, {'ok' if report.ok else 'FAILED'}")
        for problem in report.problems:
            print(f"  {problem}")
        failed |= not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
