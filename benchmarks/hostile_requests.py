"""Other clients' latency beside hostile requests (issue 21): each within 2x of idle?

A Serve app on 127.0.0.1 (Serve's defaults: 32 rows per pass, 1,024 waiting) over a store with
SmolLM2's 49k vocabulary (default: a random-weight GQA Llama made under --workdir, as the tests'
tiny store). For each hostile request, in rounds (--rounds): idle, the median time of a 4-token
greedy completion sent alone (--probes times); then the same probes while the hostile request is
sent again as soon as it finishes (one at a time, from a client process of its own), and their
median over that idle (on a shared 2-core machine the load drifts: each ratio has its own idle);
each row's figure is the median over the rounds. The hostile requests are the issue's (now refused
with a 400 at once: their answer time is reported) and the largest each cap lets through; two
benign requests with as many rows show what sharing a pass with that many rows costs here (on
CPU a pass's compute grows with its rows; offloaded on a GPU the weights' transfer dominates).

    python benchmarks/hostile_requests.py [--store STORE]  ->  benchmarks/results/hostile_requests-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

PORT = 8312
BASE = f"http://127.0.0.1:{PORT}"
PROBE = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


def post(body: dict | bytes) -> tuple[int, float]:
    """(HTTP status, seconds) of one completion request (`body`: JSON, or already encoded)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{BASE}/v1/completions", data=data, headers={"Content-Type": "application/json"})
    begin = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    return status, time.perf_counter() - begin


def hostile_requests() -> dict[str, dict]:
    from endor_ray.serve import limits

    stops = [f"never {index}" for index in range(100_000)]
    return {
        "100000 stop strings, n=4 (issue)": {"prompt": "Once upon a time", "n": 4, "max_tokens": 64, "stop": stops},
        f"{limits.MAX_STOP_STRINGS} stop strings of {limits.MAX_STOP_CHARS} chars, n=4 (cap)": {
            "prompt": "Once upon a time", "n": 4, "max_tokens": 64,
            "stop": [f"{index:03d}" + "z" * (limits.MAX_STOP_CHARS - 3) for index in range(limits.MAX_STOP_STRINGS)]},
        "logit_bias on all 49152 ids, n=16 (issue)": {"prompt": "Once upon a time", "n": 16, "max_tokens": 64,
                                                       "logit_bias": {str(i): 0.5 for i in range(49152)}},
        f"logit_bias {limits.MAX_LOGIT_BIAS} entries, n=16 (cap)": {
            "prompt": "Once upon a time", "n": 16, "max_tokens": 64,
            "logit_bias": {str(i): 0.5 for i in range(limits.MAX_LOGIT_BIAS)}},
        "64 prompts x n=16 = 1024 sequences (issue)": {"prompt": ["Once upon a time"] * 64, "n": 16, "max_tokens": 16},
        f"8 prompts x n=16 = {limits.MAX_SEQUENCES_PER_REQUEST} sequences (cap)": {
            "prompt": ["Once upon a time"] * 8, "n": 16, "max_tokens": 64},
        # Not hostile: what sharing passes with that many rows costs a probe on this machine
        "benign: n=16, greedy, nothing else (same rows as the n=16 rows)": {
            "prompt": "Once upon a time", "n": 16, "max_tokens": 64, "temperature": 0},
        "benign: 2 prompts x n=16, greedy (28 rows, as the 128-sequence row)": {
            "prompt": ["Once upon a time"] * 2, "n": 16, "max_tokens": 64, "temperature": 0},
    }


def probes(count: int) -> list[float]:
    times = []
    for _ in range(count):
        status, seconds = post(PROBE)
        assert status == 200, status
        times.append(seconds)
    return times


def hammer(body: bytes, stop, answers) -> None:
    """The hostile client, in a process of its own (its JSON and sockets do not share the probes' GIL):
    `body` sent over and over until `stop` is set; each (status, seconds) put on `answers`."""
    while not stop.is_set():
        answers.put(post(body))


def under(body: dict, count: int) -> dict:
    """The probes' times while `body` is sent over and over; the hostile answers' statuses and times."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    stop, answers = context.Event(), context.Queue()
    client = context.Process(target=hammer, args=(json.dumps(body).encode(), stop, answers), daemon=True)
    client.start()
    time.sleep(3.0)  # the client process is up and the hostile request is in the queue or running
    times = probes(count)
    stop.set()
    received = []
    while client.is_alive() or not answers.empty():
        try:
            received.append(answers.get(timeout=1.0))
        except queue.Empty:  # the client may still be finishing its last request
            if not client.is_alive():
                break
    client.join(timeout=600)
    return {"probe_median_s": statistics.median(times), "probe_max_s": max(times),
            "hostile_statuses": sorted({status for status, _ in received}),
            "hostile_median_s": statistics.median(seconds for _, seconds in received) if received else None}


def tiny_store(workdir: Path) -> Path:
    """A random-weight GQA Llama with SmolLM2's tokenizer (49152 ids), as tests/conftest.py's tiny store."""
    store = workdir / "tiny-llama-gqa"
    if (store / "manifest.json").is_file():
        return store
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_checkpoint

    from endor_ray.compress.convert import ConvertConfig, convert
    from endor_ray.compress.default_model import default_model_dir

    checkpoint = make_checkpoint(workdir / "tiny-ckpt", "llama-gqa", vocab_size=49152)
    for path in default_model_dir().iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(path, checkpoint / path.name)
    return convert(str(checkpoint), store, ConvertConfig(method="magnitude", block_size=256), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "endor-hostile")
    parser.add_argument("--probes", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the rows, each row's ratio the median")
    parser.add_argument("--max-seqs-per-request", type=int, default=None,
                        help="scheduler.max_seqs_per_request (default: Serve's, an eighth of the rows while requests share)")
    parser.add_argument("--scheduler", action="append", default=[], metavar="KEY=VALUE",
                        help="another scheduler option for the app (scheduler.KEY; repeatable), e.g. max_prefill_tokens=512")
    parser.add_argument("--only", default="", help="run only the rows whose name holds this text")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hostile_requests-cpu.json")
    args = parser.parse_args()
    scheduler_args = {}
    for option in args.scheduler:
        key, _, value = option.partition("=")
        if not key or not value.isdigit():
            parser.error(f"--scheduler takes KEY=INTEGER (e.g. max_prefill_tokens=512), got {option!r}")
        scheduler_args[f"scheduler.{key}"] = int(value)
    sys.path.insert(0, str(Path(__file__).parent))
    import ray
    from ray import serve

    from endor_ray.serve import build_app
    from kernel_bench import machine_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(tiny_store(args.workdir))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        app_args = {"store": str(store), "model_name": "hostile", "engine.gpu_memory": 0}
        if args.max_seqs_per_request is not None:
            app_args["scheduler.max_seqs_per_request"] = args.max_seqs_per_request
        app_args.update(scheduler_args)
        serve.run(build_app(app_args), name="endor", route_prefix="/")
        probes(3)  # warm-up
        idles, runs = [], {}
        for round_index in range(args.rounds):  # interleaved: each row beside an idle measurement of its own
            for name, body in hostile_requests().items():
                if args.only not in name:
                    continue
                idle = statistics.median(probes(args.probes))
                run = under(body, args.probes)
                run.update(idle_probe_median_s=idle, ratio_to_idle=run["probe_median_s"] / idle,
                           load_average=os.getloadavg())
                idles.append(idle)
                runs.setdefault(name, []).append(run)
                print(f"round {round_index} {name:55s} probe {run['probe_median_s']:.3f} s (x{run['ratio_to_idle']:.2f} of "
                      f"{idle:.3f}, max {run['probe_max_s']:.3f}); hostile {run['hostile_statuses']} in "
                      f"{run['hostile_median_s']:.3f} s; load {run['load_average'][0]:.1f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = {name: {"ratio_to_idle": statistics.median(run["ratio_to_idle"] for run in row),
                   "probe_median_s": statistics.median(run["probe_median_s"] for run in row),
                   "idle_probe_median_s": statistics.median(run["idle_probe_median_s"] for run in row),
                   "hostile_statuses": sorted({status for run in row for status in run["hostile_statuses"]}),
                   "hostile_median_s": statistics.median(run["hostile_median_s"] for run in row
                                                         if run["hostile_median_s"] is not None),
                   "rounds": row}
            for name, row in runs.items()}
    for name, row in rows.items():
        print(f"{name:55s} x{row['ratio_to_idle']:.2f} (median of {args.rounds} rounds)")
    idle = statistics.median(idles)
    result = {"idle_probe_median_s": idle, "probe": PROBE, "rows": rows,
              "max_seqs_per_request": args.max_seqs_per_request, "scheduler": args.scheduler, "machine": machine_info(),
              "load_average": os.getloadavg()}
    print(f"idle probe median {idle:.3f} s; load average {os.getloadavg()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
