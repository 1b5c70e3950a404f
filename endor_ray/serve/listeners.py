"""What the Serve app listens on, and the refusal to expose a cluster that takes code unauthenticated.

Ray Serve's replica starts an inter-deployment gRPC server on `[::]:0` (all interfaces, no option
to change it in Ray 2.60: `ray.serve._private.replica` calls `add_port_to_grpc_server(server,
"[::]:0")`). With Ray's token authentication off, its `HandleRequest` unpickles what a caller
sends, so anyone who reaches that port runs code in the replica. `bind_replica_grpc_to_node` makes
the replica bind it to the address Ray gives its node instead (127.0.0.1 for the local Ray that
`endor serve` starts; the node's own IP on a multi-node cluster, where Ray's other ports listen
too and callers reach it): nothing that Ray advertises changes, only the wildcard goes.

`check_cluster_exposure` refuses to serve on a cluster whose nodes listen on a non-loopback
address while Ray's authentication is off (every Ray port there then accepts code from the
network), unless the user says so explicitly (`--allow-unauthenticated-cluster`).
"""

from __future__ import annotations

import ipaddress
import logging
import os

from endor_ray.errors import ConfigError

log = logging.getLogger("ray.serve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.x (how a dual-stack socket shows 127.0.0.1) and
    "localhost"; a name that is not an IP address is not loopback."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (Ray's own answer where it gives one)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # another Ray version: the variable Ray reads
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return is_token_auth_enabled()


def bind_replica_grpc_to_node() -> bool:
    """In a Serve replica, before Serve starts its inter-deployment gRPC server: bind it to this
    node's Ray address instead of all interfaces. False (and a warning) where this Ray has no such
    call to redirect; the server then listens where Ray puts it."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "endor_node_bound", False):
        if original is None:
            log.warning("this Ray's Serve replica has no add_port_to_grpc_server: its gRPC server keeps Ray's "
                        "bind address (all interfaces); keep Ray's token authentication on")
        return original is not None
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    add_port.endor_node_bound = True
    replica.add_port_to_grpc_server = add_port
    return True


def check_cluster_exposure(allow_unauthenticated: bool) -> None:
    """ConfigError when Ray's auth is off and a node of the cluster listens on a non-loopback
    address, unless `allow_unauthenticated` (call after ray.init)."""
    import ray

    if allow_unauthenticated or token_auth_enabled():
        return
    exposed = sorted({node["NodeManagerAddress"] for node in ray.nodes()
                      if node.get("Alive") and not is_loopback(node["NodeManagerAddress"])})
    if exposed:
        raise ConfigError(
            f"Ray's token authentication is off (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', '')!r}) and the "
            f"cluster's nodes listen on {', '.join(exposed)}, not loopback: anyone who reaches those ports can run "
            "code on the cluster (Ray's GCS, raylets and Serve's replicas accept pickled calls). Start the cluster "
            "with RAY_AUTH_MODE=token, or pass --allow-unauthenticated-cluster if nobody else can reach this network")
