"""The `endor` command: each user mistake is one line on stderr, exit 1, and nothing written."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from endor_ray.cli import main


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *needles) -> None:
    """Exit 1 and one error line (after any progress bars): no traceback."""
    assert code == 1
    lines = [line for line in err.strip().splitlines() if not line.startswith(("load:", "load host tier:", "convert:"))]
    assert len(lines) == 1 and lines[0].startswith("endor "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def checkpoint(tiny_checkpoints, tmp_path):
    return shutil.copytree(tiny_checkpoints["llama-gqa"], tmp_path / "ckpt")


def test_convert_inspect_export_round(checkpoint, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "hf"
    code, stdout, _ = run(["convert", str(checkpoint), str(store), "--method", "magnitude", "--quiet"], capsys)
    assert code == 0 and (store / "manifest.json").is_file()
    code, stdout, _ = run(["inspect", str(store), "--json"], capsys)
    summary = json.loads(stdout)
    assert code == 0 and summary["layers_sparsity"] == pytest.approx(0.5, abs=0.01) and len(summary["layers"]) == 3
    code, stdout, _ = run(["inspect", store.resolve().as_uri()], capsys)
    assert code == 0 and "ratio" in stdout
    code, _, _ = run(["export", str(store), str(out), "--quiet"], capsys)
    assert code == 0 and (out / "model.safetensors.index.json").is_file()


def test_mixed_and_quantized_stores_show_their_settings(checkpoint, tmp_path, capsys):
    mixed, int4 = tmp_path / "mixed", tmp_path / "int4"
    # the budget counts each layer file's header and alignment, which a 64-wide model's tiny tensors
    # make a large share: 0.7 here is what 0.6 was before they were counted
    code, _, _ = run(["convert", str(checkpoint), str(mixed), "--bytes-per-weight", "0.7", "--block-size", "256",
                      "--calib-samples", "2", "--calib-seq-len", "8", "--quiet"], capsys)
    assert code == 0
    code, stdout, _ = run(["inspect", str(mixed)], capsys)
    assert code == 0 and "mixed precision per tensor within 0.7 bytes per weight" in stdout
    rows = [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    setting = r"\d+/(4|8|16|i?q\d_([01k]|nl))"  # sparsity / value bits, or a GGUF block type
    assert len(rows) == 3 and all(re.search(rf"q {setting} k {setting} .* down {setting}$", row) for row in rows)
    code, stdout, _ = run(["inspect", str(mixed), "--tensors"], capsys)
    assert code == 0 and len([line for line in stdout.splitlines() if "_proj.weight" in line]) == 3 * 7
    code, _, _ = run(["convert", str(checkpoint), str(int4), "--method", "magnitude", "--values", "int4", "--quiet"],
                     capsys)
    code, stdout, _ = run(["inspect", str(int4)], capsys)
    assert code == 0 and "values int4 (groups of 128)" in stdout


def test_bad_convert_arguments(checkpoint, tmp_path, capsys):
    dst = tmp_path / "dst"
    cases = [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
        (["--method", "random"], "unknown pruning method 'random'"),
        (["--format", "csr"], "unknown store format"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--calib-text", str(tmp_path / "missing.txt")], "does not exist"),
        (["--values", "int3"], "unknown values encoding 'int3'"),
        (["--values", "int4", "--group-size", "0"], "group size must be an integer"),
        (["--values", "int8", "--format", "dense"], "--format dense is the unquantized baseline"),
        (["--bytes-per-weight", "0"], "--bytes-per-weight must be a positive number"),
        (["--bytes-per-weight", "0.6", "--method", "magnitude"], "use --method wanda or sparsegpt"),
    ]
    for extra, needle in cases:
        code, _, err = run(["convert", str(checkpoint), str(dst), *extra], capsys)
        assert_clean_error(code, err, needle)
    assert not dst.exists()


def test_bad_sources(checkpoint, tmp_path, capsys):
    dst = tmp_path / "dst"
    code, _, err = run(["convert", str(tmp_path / "nowhere"), str(dst)], capsys)
    assert_clean_error(code, err, "neither a local checkpoint directory")

    config = checkpoint / "config.json"
    good = config.read_text()
    config.write_text("{broken")
    code, _, err = run(["convert", str(checkpoint), str(dst)], capsys)
    assert_clean_error(code, err, "config.json is not valid JSON")

    config.unlink()
    code, _, err = run(["convert", str(checkpoint), str(dst)], capsys)
    assert_clean_error(code, err, "config.json not found")

    config.write_text(json.dumps({**json.loads(good), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run(["convert", str(checkpoint), str(dst)], capsys)
    assert_clean_error(code, err, "GPT2LMHeadModel", "not supported", "llama", "opt")

    config.write_text(good)
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 10)
    code, _, err = run(["convert", str(checkpoint), str(dst)], capsys)
    assert_clean_error(code, err, "cannot read weight file")
    assert not dst.exists()


def test_existing_destination_needs_force(checkpoint, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run(["convert", str(checkpoint), str(dst), "--method", "magnitude"], capsys)
    assert_clean_error(code, err, "already exists", "--force")
    assert (dst / "keep.txt").read_text() == "mine"


def test_inspect_and_export_errors(tmp_path, capsys):
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    assert_clean_error(code, err, "not an endor store")
    code, _, err = run(["export", str(tmp_path / "none"), str(tmp_path / "out")], capsys)
    assert_clean_error(code, err, "not an endor store")
    assert not (tmp_path / "out").exists()


def test_console_script_is_installed(tmp_path):
    endor = Path(sys.executable).with_name("endor")  # installed beside the venv's python
    result = subprocess.run([endor, "inspect", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("endor inspect: error:")
    assert "Traceback" not in result.stderr


def test_generate_json_and_verify(tiny_stores, capsys):
    store = str(tiny_stores["llama-gqa"])
    code, stdout, _ = run(["generate", store, "--in-process", "--prompt", "Hello there", "--prompt", "A",
                           "--max-new-tokens", "4", "--gpu-memory", "1", "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    assert [c["prompt"] for c in result["completions"]] == ["Hello there", "A"]
    assert all(0 < len(c["token_ids"]) <= 4 for c in result["completions"])
    assert {"tokens_per_s", "bytes_to_device_per_pass", "time_s", "tier_hits"} <= set(result["stats"])
    assert result["stats"]["tier_hits"]["device"] > 0 and result["stats"]["tier_hits"]["host"] > 0
    code, stdout, _ = run(["verify", store, "--prompt", "Hello there", "--prompt", "A", "--max-new-tokens", "5",
                           "--gpu-memory", "0", "--host-memory", "0"], capsys)
    assert code == 0 and "identical to transformers" in stdout


def test_generate_prints_text_as_it_comes(tiny_stores, capsys):
    code, stdout, err = run(["generate", str(tiny_stores["opt"]), "--in-process", "--prompt", "Hello", "--max-new-tokens", "3"], capsys)
    assert code == 0 and stdout.startswith("Hello")
    assert "tokens/s" in err and "layer hits per tier" in err


def test_generate_bad_input(tiny_stores, tmp_path, capsys):
    store = str(tiny_stores["opt"])
    cases = [
        ([], "at least one --prompt"),
        (["--prompt", "x", "--gpu-memory", "huge"], "neither a layer count"),
        (["--prompt", "x", "--gpu-memory", "1KB", "--device", "cpu"], "below the minimum"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "word " * 300], "exceeds the model's context"),
        (["--prompt", "x", "--prefetch", "-1"], "prefetch depth"),
    ]
    for extra, needle in cases:
        code, _, err = run(["generate", store, "--in-process", *extra], capsys)
        assert_clean_error(code, err, needle)
    code, _, err = run(["generate", str(tmp_path), "--prompt", "x"], capsys)
    assert_clean_error(code, err, "not an endor store")


def test_unknown_flag_shows_the_subcommand_usage_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "some/store", "--promt", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: endor generate" in err and "unrecognized arguments: --promt" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("endor-ray ")


def test_blank_prompt_is_refused_before_the_engine_starts(tiny_stores, capsys, monkeypatch):
    from endor_ray.engine import engine as engine_module

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine must not start for a bad prompt")

    monkeypatch.setattr(engine_module.Engine, "__init__", no_engine)
    code, _, err = run(["generate", str(tiny_stores["opt"]), "--in-process", "--prompt", "   "], capsys)
    assert_clean_error(code, err, "must have some text")
    code, _, err = run(["generate", str(tiny_stores["opt"]), "--prompt", "word " * 300], capsys)  # Ray not started
    assert_clean_error(code, err, "exceeds the model's context")


def test_inspect_into_a_closed_pipe_is_quiet(tiny_stores):
    endor = Path(sys.executable).with_name("endor")
    done = subprocess.run(f"'{endor}' inspect '{tiny_stores['opt']}' | head -n 1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.startswith("store") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_stores_are_readable_by_other_users(checkpoint, tmp_path, capsys):
    """Other users' Ray nodes read the store: permissions follow the umask, not mkdtemp's 0700."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        code, _, _ = run(["convert", str(checkpoint), str(tmp_path / "store"), "--method", "magnitude", "--quiet"], capsys)
    finally:
        os.umask(old)
    assert code == 0
    for path in [tmp_path / "store", *(tmp_path / "store").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_serve_run_with_a_bad_store_is_one_line_and_exit_1(tmp_path):
    import os

    serve = Path(sys.executable).with_name("serve")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([serve, "run", "endor_ray.serve:build_app", f"store={tmp_path / 'nope'}"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "not an endor store" in errors[0]


def test_serve_args_from_the_command_line_and_yaml():
    from endor_ray.errors import ConfigError
    from endor_ray.serve.config import serve_config_from_args

    strings = serve_config_from_args({"store": "s", "scheduler.max_num_seqs": "8", "engine.gpu_memory": "12",
                                      "protect_health": "true"})
    typed = serve_config_from_args({"store": "s", "scheduler": {"max_num_seqs": 8}, "engine": {"gpu_memory": 12},
                                    "protect_health": True})
    assert strings == typed and strings.scheduler.max_num_seqs == 8 and strings.engine.gpu_memory == 12 and strings.protect_health
    assert serve_config_from_args({"store": "s", "engine.gpu_memory": "8GiB"}).engine.gpu_memory == "8GiB"
    with pytest.raises(ConfigError, match="must be a number"):
        serve_config_from_args({"store": "s", "scheduler.max_num_seqs": "eight"})
    with pytest.raises(ConfigError, match="unknown Serve app arguments"):
        serve_config_from_args({"store": "s", "batch_wait_ms": "5"})


def test_older_flat_serve_args_name_their_nested_spelling():
    from endor_ray.errors import ConfigError
    from endor_ray.serve.config import environment_names, serve_config_from_args

    with pytest.raises(ConfigError, match=r"max_batch_size is scheduler\.max_num_seqs, prefetch is engine\.prefetch_depth"):
        serve_config_from_args({"store": "s", "max_batch_size": "8", "prefetch": "2"})
    with pytest.raises(ConfigError, match=r"unknown Serve app arguments \['engine.prefetch'\]"):
        serve_config_from_args({"store": "s", "engine": {"prefetch": 2}})
    names = environment_names()
    assert names["ENDOR_SCHEDULER_MAX_NUM_SEQS"] == "scheduler.max_num_seqs" and names["ENDOR_STORE"] == "store"


def test_engine_options_are_declared_once_for_every_entry_point():
    """Every field of the engine, scheduler and cluster configs has one flag, and every entry point has
    the same flags, mapped onto the same fields; each entry point keeps its own defaults."""
    import dataclasses

    from endor_ray.engine.config import EngineConfig
    from endor_ray.engine.scheduler import SchedulerConfig
    from endor_ray.errors import ConfigError
    from endor_ray.jobs.config import job_config
    from endor_ray.jobs.generate import build_parser as job_parser
    from endor_ray.service.driver import ClusterConfig
    from endor_ray.cli import build_parser
    from endor_ray.utils.options import OPTIONS, UNFLAGGED, configs_from

    classes = {"engine": EngineConfig, "scheduler": SchedulerConfig, "cluster": ClusterConfig}
    for section, cls in classes.items():
        flagged = [option.field for option in OPTIONS[section]]
        assert sorted(flagged + sorted(UNFLAGGED.get(section, ()))) == sorted(f.name for f in dataclasses.fields(cls))
    subcommands = build_parser().subcommands

    def dests(parser) -> set[str]:
        return {action.dest for action in parser._actions if "." in action.dest}

    everything = {f"{section}.{option.field}" for section in classes for option in OPTIONS[section]}
    assert dests(subcommands["generate"]) == dests(subcommands["serve"]) == dests(job_parser()) == everything
    assert dests(subcommands["verify"]) == {name for name in everything if not name.startswith("cluster.")}

    flags = ["--prefetch", "3", "--disk-io", "direct", "--host-memory", "1GiB", "--max-batch-size", "5", "--workers",
             "2", "--no-spill-to-disk", "--gpu-memory", "12"]
    args = subcommands["generate"].parse_args(["some/store", *flags])
    configs = configs_from(vars(args), args.sections)
    assert configs["engine"] == EngineConfig(prefetch_depth=3, disk_io="direct", host_memory="1GiB", gpu_memory=12)
    assert configs["scheduler"] == SchedulerConfig(max_num_seqs=5)
    assert configs["cluster"] == ClusterConfig(num_workers=2, spill_to_disk=False)
    with pytest.raises(ConfigError, match="engine has no setting prefetch"):
        configs_from({"engine.prefetch": 2}, args.sections)
    serve_args = subcommands["serve"].parse_args(["some/store", *flags])
    assert configs_from(vars(serve_args), serve_args.sections) == {**configs, "scheduler": SchedulerConfig(5, max_waiting=1024)}
    job = job_config(job_parser().parse_args(["--store", "s", "--input", "i", "--output", "o", *flags]))
    assert (job.engine, job.cluster) == (configs["engine"], dataclasses.replace(configs["cluster"], timeout_s=600.0))
    # the defaults users have seen: a server 32 sequences per pass and 1,024 waiting; a job 64 and 600 s
    serve_default = subcommands["serve"].parse_args(["s"])
    assert configs_from(vars(serve_default), serve_default.sections)["scheduler"] == SchedulerConfig(32, max_waiting=1024)
    job = job_config(job_parser().parse_args(["--store", "s", "--input", "i", "--output", "o"]))
    assert job.scheduler == SchedulerConfig(64) and job.cluster.timeout_s == 600.0 and job.engine == EngineConfig()


def test_serve_build_writes_a_deployable_config(tiny_stores, tmp_path):
    import os

    import yaml
    from ray.serve.schema import ServeDeploySchema

    serve = Path(sys.executable).with_name("serve")
    env = {**os.environ, "ENDOR_STORE": str(tiny_stores["opt"]), "ENDOR_SCHEDULER_MAX_NUM_SEQS": "8"}
    done = subprocess.run([serve, "build", "endor_ray.serve:application", "-o", tmp_path / "serve.yaml"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    assert config["applications"][0]["import_path"] == "endor_ray.serve:application"
    env.pop("ENDOR_STORE")
    done = subprocess.run([serve, "build", "endor_ray.serve:application"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 1 and "set ENDOR_STORE" in done.stderr and "Traceback" not in done.stderr
