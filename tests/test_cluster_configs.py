"""The deployment files in cluster/ agree with the code: the custom resource names the driver reads,
the Serve import path and its arguments, the RayJob entrypoint and its flags, token auth kept on."""

import importlib
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from endor_ray.service.driver import SHARD_RESOURCE, WORKER_RESOURCE

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
KUBERAY_MANIFESTS = ["rayservice.yaml", "rayjob.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def start_resources(group: dict) -> dict:
    """A KubeRay group's custom resources: rayStartParams.resources is a shell-quoted JSON object."""
    value = group.get("rayStartParams", {}).get("resources")
    if value is None:
        return {}
    [unquoted] = shlex.split(value)
    return json.loads(unquoted)


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig" if manifest["kind"] == "RayService" else "rayClusterSpec"]


@pytest.mark.parametrize("name", [*KUBERAY_MANIFESTS, "endor-cluster.yaml"])
def test_token_auth_stays_on(name):
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text()
    if name in KUBERAY_MANIFESTS:
        assert cluster_spec(load(name))["authOptions"] == {"mode": "token"}
    else:
        config = load(name)
        for command in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]:
            assert "ray start" not in command or "RAY_AUTH_MODE=token ray start" in command
        assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_groups_carry_the_driver_resources(name):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = cluster_spec(manifest)
    assert start_resources(spec["headGroupSpec"]) == {}  # nothing of the model lands on the head
    groups = {group["groupName"]: start_resources(group) for group in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in spec["workerGroupSpecs"] if start_resources(g) == {WORKER_RESOURCE: 1}]
    assert len(gpu_groups) == 1, groups
    [container] = gpu_groups[0]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {SHARD_RESOURCE: 1} in groups.values(), groups
    assert all(resources in ({WORKER_RESOURCE: 1}, {SHARD_RESOURCE: 1}) for resources in groups.values())


def test_launcher_node_types_carry_the_driver_resources():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("endor-cluster.yaml")
    validate_config(prepare_config(config))  # Ray's own schema for cluster launcher configs
    node_types = config["available_node_types"]
    assert not {SHARD_RESOURCE, WORKER_RESOURCE} & set(node_types[config["head_node_type"]]["resources"])
    workers = [t for t in node_types.values() if WORKER_RESOURCE in t["resources"]]
    assert len(workers) == 1 and workers[0]["resources"].get("GPU", 0) >= 1
    assert any(SHARD_RESOURCE in t["resources"] and "GPU" not in t["resources"] for t in node_types.values())
    assert any("pip install" in command and "endor-ray" in command for command in config["setup_commands"])


def test_rayservice_application_matches_build_app():
    serve_config = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    assert app["route_prefix"] == "/"
    module_name, _, attribute = app["import_path"].partition(":")
    assert (module_name, attribute) == ("endor_ray.serve", "build_app")
    serve = importlib.import_module(module_name)
    assert callable(getattr(serve, attribute))
    assert "store" in app["args"]
    assert set(app["args"]) <= serve.APP_ARGS, set(app["args"]) - serve.APP_ARGS
    from endor_ray.serve.config import serve_config_from_args

    serve_config_from_args(app["args"])  # the nested settings and the values are valid too


def test_rayjob_entrypoint_parses_with_the_job_parser():
    from endor_ray.jobs.config import job_config
    from endor_ray.jobs.generate import build_parser

    program, flag, module, *argv = shlex.split(load("rayjob.yaml")["spec"]["entrypoint"])
    assert (program, flag, module) == ("python", "-m", "endor_ray.jobs.generate")
    importlib.import_module(module)
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
    assert args.store.startswith("s3://") and args.output.endswith("/")
    job_config(args)  # the values are valid too


def test_local_cluster_script():
    script = CLUSTER / "local-cluster.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True, timeout=30).returncode == 0
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "start [N]" in usage.stdout and "stop" in usage.stdout
    text = script.read_text()
    assert f'{{"{WORKER_RESOURCE}": 1}}' in text and f'{{"{SHARD_RESOURCE}": 1}}' in text


@pytest.fixture
def state_dir():
    """Short (Ray's socket paths under it must stay below 108 bytes), removed afterwards."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="ec-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _script_env(state_dir: str, base_port: int) -> dict:
    import os

    return {**os.environ, "PORT": str(base_port), "DASHBOARD_PORT": str(base_port + 1),
            "CLIENT_PORT": str(base_port + 2), "AGENT_PORT": str(base_port + 3),
            "STATE_DIR": state_dir, "RAY_AUTH_MODE": "disabled", "ALLOW_UNAUTHENTICATED_CLUSTER": "1",
            "OBJECT_STORE_MEMORY": str(200 << 20)}


def test_local_cluster_refuses_a_taken_port(state_dir):
    """A taken agent port used to give a 'started' cluster on which `ray job submit` then failed."""
    import socket

    env = _script_env(state_dir, 46100)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 46103))
        taken.listen()
        done = subprocess.run(["bash", CLUSTER / "local-cluster.sh", "start", "1"], capture_output=True, text=True,
                              env=env, timeout=60)
    assert done.returncode == 1 and "port 46103 (AGENT_PORT) is taken" in done.stderr


@pytest.mark.slow
def test_local_cluster_starts_serves_and_stops(state_dir, tiny_stores):
    """cluster/README.md's "Trying it on one machine", with ports of its own."""
    import sys

    env = _script_env(state_dir, 46200)
    script = CLUSTER / "local-cluster.sh"
    try:
        started = subprocess.run(["bash", script, "start", "2"], capture_output=True, text=True, env=env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "a head (endor_worker) + 2 shard nodes" in started.stdout
        status = subprocess.run(["bash", script, "status"], capture_output=True, text=True, env=env, timeout=60)
        assert "endor_shard" in status.stdout and "endor_worker" in status.stdout
        endor = Path(sys.executable).with_name("endor")
        generated = subprocess.run([endor, "generate", str(tiny_stores["opt"]), "--address", "127.0.0.1:46200",
                                    "--prompt", "The capital of France is", "--max-new-tokens", "4",
                                    "--shard-memory", "100KB", "--gpu-memory", "0", "--json"],
                                   capture_output=True, text=True, env=env, timeout=300)
        assert generated.returncode == 0, generated.stderr[-3000:]
        result = json.loads(generated.stdout)
        assert result["stats"]["tier_hits"]["remote"] > 0 and len(result["completions"][0]["token_ids"]) == 4
    finally:
        stopped = subprocess.run(["bash", script, "stop"], capture_output=True, text=True, env=env, timeout=120)
    assert "stopped 3 nodes" in stopped.stdout and "still running" not in stopped.stderr
