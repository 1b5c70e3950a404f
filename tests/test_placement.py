"""Placement: a plain function from cluster facts to which node holds which layers."""

import pytest

from endor_ray.service.placement import NodeInfo, PlacementError, plan_placement


def test_worker_node_first_then_largest_budget():
    nodes = [NodeInfo("small", 250), NodeInfo("big", 1000), NodeInfo("worker", 300)]
    placement = plan_placement([100] * 10, nodes, worker_node_id="worker")
    assert placement.memory == {"worker": (0, 1, 2), "big": (3, 4, 5, 6, 7, 8, 9)}
    assert placement.disk == {}
    assert placement.node_of(2) == "worker" and placement.node_of(3) == "big"
    assert placement.nodes == ["big", "worker"]


def test_everything_fits_on_the_worker_node():
    placement = plan_placement([10] * 4, [NodeInfo("a", 10**9), NodeInfo("worker", 10**9)], "worker")
    assert placement.memory == {"worker": (0, 1, 2, 3)}


def test_runs_are_contiguous_and_cover_every_layer_once():
    sizes = [30, 70, 20, 90, 10, 60, 40]
    nodes = [NodeInfo("a", 120), NodeInfo("b", 100), NodeInfo("c", 110)]
    placement = plan_placement(sizes, nodes, worker_node_id=None)
    seen = [idx for node in placement.nodes for idx in placement.layers_of(node)]
    assert sorted(seen) == list(range(len(sizes)))
    for node in placement.nodes:
        layers = placement.memory[node]
        assert list(layers) == list(range(layers[0], layers[-1] + 1))
        assert sum(sizes[idx] for idx in layers) <= {"a": 120, "b": 100, "c": 110}[node]


def test_spill_to_disk_or_say_what_is_missing():
    nodes = [NodeInfo("a", 250), NodeInfo("b", 150)]
    placement = plan_placement([100] * 6, nodes, worker_node_id="b")
    assert placement.memory == {"b": (0,), "a": (1, 2)}
    assert sum(len(layers) for layers in placement.disk.values()) == 3
    with pytest.raises(PlacementError, match=r"\(400 B over 2 nodes\).*600 B of layers: 300 B \(3 layers\) missing"):
        plan_placement([100] * 6, nodes, worker_node_id="b", spill_to_disk=False)


def test_no_nodes():
    with pytest.raises(PlacementError, match="no node"):
        plan_placement([1], [], None)


def test_running_local_cluster_is_found_only_when_it_answers(tmp_path, monkeypatch):
    import socket

    from endor_ray.service.ray_session import running_local_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert running_local_cluster() is None  # no `ray start` ever ran here
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    assert running_local_cluster() == f"127.0.0.1:{port}"
    listener.close()  # the cluster stopped, its file stayed behind
    assert running_local_cluster() is None


def test_another_users_cluster_is_never_joined(tmp_path, monkeypatch):
    import os
    import socket

    from endor_ray.service.ray_session import running_local_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        path = tmp_path / "ray_current_cluster"
        path.write_text(f"127.0.0.1:{listener.getsockname()[1]}")
        assert running_local_cluster() is not None
        if os.getuid() != 0:
            pytest.skip("changing the file's owner needs root")
        os.chown(path, 12345, 12345)  # /tmp/ray is shared between users
        assert running_local_cluster() is None


def test_a_token_at_hand_turns_token_auth_on(tmp_path, monkeypatch):
    import os

    from endor_ray.service.ray_session import use_token_if_present

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    use_token_if_present()
    assert "RAY_AUTH_MODE" not in os.environ  # no token: leave Ray's own behaviour alone
    (tmp_path / "auth_token").write_text("secret")
    use_token_if_present()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    use_token_if_present()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands
