"""Getting onto a Ray cluster from a command or a job: which cluster, which address, which auth.

Ray reads its settings (`RAY_AUTH_MODE`, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`) once per process,
so the entry points call `use_loopback_ray` or `use_token_if_present` before Ray is imported;
`init_ray` then joins the cluster asked for, the one `ray start` runs on this machine, or starts
a local one on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

from endor_ray.errors import EndorError


def use_loopback_ray() -> None:
    """Make a local Ray started by this process bind 127.0.0.1, with token authentication on and
    without Ray's notice about it (call before Ray is imported: Ray reads both once)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # set explicitly, Ray enables it without a warning


def use_token_if_present() -> None:
    """Before joining a cluster (call before Ray is imported): where a Ray token is at hand and the
    user set no mode, use token authentication, as Ray 2.60's clusters do by default. A client
    without it retries unauthenticated for half a minute and then reports a wrong address."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def running_local_cluster() -> str | None:
    """The GCS address of a cluster `ray start --head` runs on this machine, if it answers."""
    temp_dir = os.environ.get("RAY_TMPDIR", "/tmp/ray")
    path = os.path.join(temp_dir, "ray_current_cluster")
    try:
        if os.stat(path).st_uid != os.getuid():  # /tmp/ray is shared: never join another user's cluster
            return None
        with open(path) as f:
            address = f.read().strip()
        host, _, port = address.rpartition(":")
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return None
    return address


def init_ray(address: str | None, timeout_s: float = 30.0) -> bool:
    """Connect to `address`, or without one to the cluster `ray start` runs on this machine, or
    start a local single-node Ray on 127.0.0.1 for this process; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        address = running_local_cluster()
    if address is None:
        # Keeps a local Ray on 127.0.0.1 only if set before Ray is first imported: the CLI and
        # the batch job set it at start (`use_loopback_ray`); here it is a last chance.
        use_loopback_ray()
        from endor_ray.service.reaper import reap_with_this_process

        reap_with_this_process()  # the local Ray dies with this process, even by kill -9
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        return True
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=min(timeout_s, 10)).close()
        except (OSError, ValueError) as exc:
            raise EndorError(f"no Ray cluster answers at {address} ({exc}); check the address and that "
                             "`ray start --head` runs there") from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if os.environ.get("RAY_AUTH_MODE") != "token":
            raise EndorError(
                f"cannot connect to the Ray cluster at {address} ({str(exc).splitlines()[0]}); if it uses token "
                "authentication (Ray's default since 2.60), export RAY_AUTH_MODE=token and give its token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN") from None
        raise EndorError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    return False
