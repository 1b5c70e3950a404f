"""The service against a hostile user: listeners, cost caps, fair admission, metrics, malformed requests.

Issue 21's defects, each against a real server: `endor serve` in a subprocess for what listens
where (both Ray auth modes), one in-process Serve app for the requests.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from endor_ray.serve.listeners import is_loopback


def _process_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(processes: list) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket these processes listen on."""
    import psutil

    pids = {process.pid: process for process in processes}
    found = []
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids:
            try:
                name = pids[connection.pid].name()
            except psutil.Error:
                name = "?"
            found.append((connection.laddr.ip, connection.laddr.port, name))
    return found


@pytest.mark.parametrize("auth_mode", ["token", "disabled"])
def test_endor_serve_listens_on_loopback_only(tiny_stores, auth_mode):
    """Serve's replica gRPC server (which unpickles its callers' bytes when Ray's auth is off) bound
    all interfaces; now nothing of `endor serve` and its local Ray listens beyond loopback."""
    port = {"token": 8141, "disabled": 8142}[auth_mode]
    temp_dir = tempfile.mkdtemp(prefix="eh-", dir="/tmp")  # short: Ray's socket paths stay < 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": auth_mode, "RAY_TMPDIR": temp_dir}
    if auth_mode == "token":
        env["RAY_AUTH_TOKEN"] = "0123456789abcdef0123456789abcdef"
    endor = Path(sys.executable).with_name("endor")
    log_path = Path(temp_dir) / "serve.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([endor, "serve", str(tiny_stores["llama-gqa"]), "--port", str(port),
                                   "--gpu-memory", "0"], stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "serving 'llama-gqa'" not in log_path.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                         data=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
        processes = _process_tree(server.pid)
        listening = _listening(processes)
        names = {name for _, _, name in listening}
        assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in listening}  # the check sees our sockets
        assert any("ServeRepli" in name for name in names), listening
        exposed = [entry for entry in listening if not is_loopback(entry[0])]
        assert exposed == [], f"listening beyond loopback with RAY_AUTH_MODE={auth_mode}: {exposed}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # endor serve shuts Serve and its Ray down on SIGTERM
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        time.sleep(2)
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its session outlived it
        except ProcessLookupError:
            pass


def test_a_cluster_exposed_without_auth_is_refused(monkeypatch):
    """With Ray's auth off, nodes on a non-loopback address mean code from the network: refused
    unless explicitly allowed; loopback nodes are fine."""
    import ray

    from endor_ray.errors import ConfigError
    from endor_ray.serve import listeners

    monkeypatch.setattr(listeners, "token_auth_enabled", lambda: False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.1.2.3"},
                                               {"Alive": True, "NodeManagerAddress": "127.0.0.1"}])
    with pytest.raises(ConfigError, match="10.1.2.3.*--allow-unauthenticated-cluster"):
        listeners.check_cluster_exposure(allow_unauthenticated=False)
    listeners.check_cluster_exposure(allow_unauthenticated=True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}])
    listeners.check_cluster_exposure(allow_unauthenticated=False)
    assert all(is_loopback(host) for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"))


def test_the_local_cluster_refuses_to_start_unauthenticated():
    """local-cluster.sh's nodes listen on the machine's interface: with auth off it starts nothing
    unless ALLOW_UNAUTHENTICATED_CLUSTER=1 says so."""
    script = Path(__file__).resolve().parent.parent / "cluster" / "local-cluster.sh"
    state_dir = tempfile.mkdtemp(prefix="ec-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "STATE_DIR": state_dir, "PORT": "46300"}
    env.pop("ALLOW_UNAUTHENTICATED_CLUSTER", None)
    done = subprocess.run(["bash", script, "start", "1"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "ALLOW_UNAUTHENTICATED_CLUSTER=1" in done.stderr
    assert not Path(state_dir, "pids").exists()
