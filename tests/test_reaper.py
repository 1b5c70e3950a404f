"""service/reaper.py without Ray: a driver that calls reap_with_this_process(), a child that
carries its token and a grandchild that does not (as Ray's agents, which overwrite their
environment with their titles), the child gone before the driver (as the raylet, killed by Ray's
fate sharing at the driver's death, can be gone before the watchdog looks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import os, subprocess, sys, time
from endor_ray.service.reaper import TOKEN_VARIABLE, reap_with_this_process
reap_with_this_process()
grandchild = "import time; time.sleep(120)"
clean = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=eval(sys.argv[2])); "
    "print(p.pid, flush=True); time.sleep(120)", grandchild, repr(clean)], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_process_orphaned_before_the_driver_dies_is_still_reaped():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child, grandchild = (int(pid) for pid in driver.stdout.readline().split())
    try:
        assert os.environ.get("ENDOR_RAY_REAP_TOKEN") is None
        assert b"ENDOR_RAY_REAP_TOKEN=" in Path(f"/proc/{child}/environ").read_bytes()
        assert b"ENDOR_RAY_REAP_TOKEN=" not in Path(f"/proc/{grandchild}/environ").read_bytes()
        time.sleep(2.5)  # the watchdog looks once a second
        os.kill(child, signal.SIGKILL)  # the grandchild is now init's: no token, no parent leads to it
        time.sleep(0.5)
        assert _alive(grandchild)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), "the orphaned grandchild outlived the driver"
    finally:
        for pid in (driver.pid, child, grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_after_a_clean_exit_the_watchdog_kills_nothing_and_exits():
    """A driver that ends normally takes its watchdog with it and leaves a stranger alone."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    script = ("from endor_ray.service.reaper import reap_with_this_process; import time; "
              "reap_with_this_process(); time.sleep(1.5)")
    try:
        before = {entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()}
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60, check=True)
        time.sleep(1.0)
        watchdogs = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit() and entry.name not in before
                     and b"ENDOR_RAY_REAP_TOKEN" in _cmdline(entry)]
        assert not [entry for entry in watchdogs if _alive(int(entry.name))]
        assert _alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""
