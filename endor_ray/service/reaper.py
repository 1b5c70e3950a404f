"""A local Ray that dies with the process that started it, even when that process is killed with -9.

`reap_with_this_process()` (called just before `ray.init` starts a local cluster) marks this
process's environment with a token that every process it starts from then on inherits (Ray's
GCS, raylet, and the raylet's workers, which keep Ray's environment), and starts a small
watchdog holding the read end of a pipe whose write end only this process has. When this process
ends, however it ends, the kernel closes the write end; the watchdog reads end-of-file and
SIGKILLs every process whose environment carries the token (a worker orphaned by its raylet
included: nothing is found through a parent that is gone), every descendant of those, and every
process it saw as one of those while it waited. It looks once a second because Ray's dashboard and
runtime-env agents rewrite their environment's memory with their process titles, so only their
parent, the raylet, finds them, and the raylet dies with this process (Ray's own fate sharing) and
may be gone before the watchdog looks: the agents, then children of init, would be found by nothing.
All are stopped before any is killed. After a clean `ray.shutdown()` there
is nothing left to kill and the watchdog just exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

TOKEN_VARIABLE = "ENDOR_RAY_REAP_TOKEN"
_held: list[int] = []  # the pipe's write end, open for this process's life (never written)

WATCHDOG = r"""
import os, select, signal, sys
token = ("%s=" + sys.argv[1]).encode()

def processes():
    found = {}  # pid -> (parent pid, start time, carries the token)
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{name}/environ", "rb") as f:
                    marked = token in f.read().split(b"\0")
                found[int(name)] = (int(fields[1]), fields[19], marked)
            except (OSError, ValueError, IndexError):
                pass
    return found

def doomed(found, known):
    # The token carriers, every process seen as one of these before (same pid and start time: not a
    # stranger that reused the pid), and every descendant of either.
    chosen = {pid for pid, (_, started, marked) in found.items() if marked or known.get(pid) == started}
    grew = True
    while grew:
        children = {pid for pid, (parent, _, _) in found.items() if parent in chosen} - chosen
        chosen |= children
        grew = bool(children)
    return {pid: found[pid][1] for pid in chosen}

known = {}
while True:
    if select.select([0], [], [], 1.0)[0]:
        if not os.read(0, 1 << 16):
            break
    else:
        known = doomed(processes(), known)
targets = doomed(processes(), known)
for pid in targets:  # stopped first, so none starts a child between the scan and the kill
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError:
        pass
for pid in doomed(processes(), {**known, **targets}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
""" % TOKEN_VARIABLE


def reap_with_this_process() -> None:
    """Make the processes this process starts from now on (a local Ray) die when it dies (Linux)."""
    if _held or not os.path.isdir("/proc"):
        return  # once per process; elsewhere Ray's own fate sharing is all there is
    token = uuid.uuid4().hex
    read_end, write_end = os.pipe()  # not inheritable: Ray's processes never hold the write end
    environment = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    subprocess.Popen([sys.executable, "-c", WATCHDOG, token], stdin=read_end, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env=environment, start_new_session=True)
    os.close(read_end)
    _held.append(write_end)
    os.environ[TOKEN_VARIABLE] = token
