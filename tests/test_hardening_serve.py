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
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                assert answer.status == 200
        except (urllib.error.URLError, OSError) as exc:
            pytest.fail(f"the first request failed ({exc}); the server's log ends:\n{log_path.read_text()[-3000:]}")
        processes = _process_tree(server.pid)
        listening = _listening(processes)
        names = {name for _, _, name in listening}
        assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in listening}  # the check sees our sockets
        assert any("ServeRepli" in name for name in names), (listening, [p.pid for p in processes])
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


# -- fair admission (the scheduler alone) -------------------------------------------------------

def _seqs(count: int, length: int = 3):
    from endor_ray.engine.sampling import SamplingParams
    from endor_ray.engine.sequence import Sequence

    return [Sequence("x", list(range(length)), SamplingParams(max_new_tokens=4)) for _ in range(count)]


def test_admission_interleaves_requests_and_hands_back_rows_over_the_share():
    """A 100-sequence request used to hold the whole queue ahead of a later 1-sequence one (FIFO),
    then every row but the cap's spare ones, so a later request shared passes as big as the big
    request's (x7-8 its idle latency on a CPU)."""
    from endor_ray.engine.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_waiting=200, max_seqs_per_request=2))
    big, small = _seqs(100), _seqs(1)
    scheduler.add(big)
    running = scheduler.admit([])
    assert running == big[:8]  # alone, it holds every row
    assert scheduler.preempt(running) == []  # nobody waits
    big[0].output_ids, big[1].output_ids = [5, 6], [5]  # the furthest along are kept
    scheduler.add(small)
    back = scheduler.preempt(running)
    assert back == big[2:8] and len(scheduler) == 100 - 8 + 6 + 1  # over its share of 2: handed back
    running = big[:2]
    assert scheduler.admit(running) == small  # the later request joins; the big one waits at its share
    running += small
    assert scheduler.preempt(running) == [] and scheduler.admit(running) == []
    again = _seqs(2)
    scheduler.add(again)
    turn = scheduler.admit(big[:2])  # the small one left; two requests share
    assert turn == again and scheduler.admit(big[:2] + again) == []
    assert scheduler.admit(big[:2]) == big[2:8]  # alone again: its handed-back rows first, up to every row


def test_a_request_larger_than_the_queue_is_refused_at_once_and_a_full_queue_says_so():
    from endor_ray.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
    from endor_ray.errors import ConfigError

    scheduler = Scheduler(SchedulerConfig(max_waiting=10))
    with pytest.raises(ConfigError, match="this request has 11 sequences; the server queues at most 10"):
        scheduler.add(_seqs(11))
    scheduler.add(_seqs(8))
    with pytest.raises(QueueFull, match="8 sequences are waiting already and this request's 3 would pass the limit "
                                        "of 10; retry later"):
        scheduler.add(_seqs(3))


def test_only_a_body_that_may_hold_a_lone_surrogate_is_walked_for_one(monkeypatch):
    """A 1.5 MB body of 100,000 stop strings took 86 ms to refuse, 53 of them walking every string for
    a lone surrogate; a client sending it in a loop took a core from the others (x2.4 their latency)."""
    from endor_ray.serve import protocol
    from endor_ray.serve.protocol import APIError, CompletionRequest, parse

    for body in (b'{"prompt": "a\\ud800b"}', b'{"prompt": "a\\uDFFF"}', b'{"prompt": "a\xed\xa0\x80b"}',
                 '{"prompt": "\ud800"}'.encode("utf-16", "surrogatepass")):
        with pytest.raises(APIError, match="lone UTF-16 surrogate"):
            parse(body, CompletionRequest)
    assert parse(b'{"prompt": "caf\xc3\xa9 \\ud83d\\ude00"}', CompletionRequest).prompt == "caf\u00e9 \U0001f600"
    walked = []
    monkeypatch.setattr(protocol, "_first_unencodable", lambda data: walked.append(data))
    parse(json.dumps({"prompt": "x", "stop": [f"never {index}" for index in range(100_000)]}).encode(),
          CompletionRequest)  # (the caps are checked after parsing: limits.check_costs)
    assert walked == []
    parse(b'{"prompt": "\\ud83d\\ude00"}', CompletionRequest)
    assert len(walked) == 1


def test_the_surrogate_prescan_finds_what_one_regex_of_its_three_patterns_finds():
    """The pre-scan looks for each pattern's literal start before its regex (the one regex of all three
    scanned 1.3 MB in 11 ms); it must answer as that regex does on any bytes."""
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from endor_ray.serve.protocol import maybe_surrogate

    one_regex = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|\x00")
    pieces = st.sampled_from([b"\\", b"u", b"d", b"D", b"8", b"b", b"F", b"7", b"\xed", b"\xa0", b"\xbf", b"\xc0",
                              b"\x00", b"x", b'"'])

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(pieces, max_size=12).map(b"".join))
    def agrees(raw):
        assert maybe_surrogate(raw) == (one_regex.search(raw) is not None)

    agrees()


def test_stop_strings_are_searched_in_the_new_text_only():
    """Each token searched the whole text for every stop string (quadratic); a match straddling
    the new token's start is still found."""
    from endor_ray.engine.sampling import SamplingParams
    from endor_ray.engine.sequence import Sequence

    class Letters:  # token id -> one letter
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + token % 26) for token in ids)

    class Counting(str):
        calls: list = []

        def find(self, sub, start=0, *rest):
            Counting.calls.append(len(self) - start)
            return super().find(sub, start, *rest)

    seq = Sequence("x", [0], SamplingParams(max_new_tokens=400, stop=("xyz",)))
    letters = Letters()
    for token in range(300):  # a..z repeated: "xyz" first ends at token 25
        seq.append(token % 23, letters, set())  # a..w: never "xyz"
    assert not seq.finished
    original = letters.decode
    letters.decode = lambda ids, skip_special_tokens=True: Counting(original(ids))
    seq.append(23, letters, set())
    seq.append(24, letters, set())
    assert Counting.calls and max(Counting.calls) < 20  # the new text and a margin, not 300 characters
    seq.append(25, letters, set())
    assert seq.finished and seq.finish_reason == "stop" and len(seq.text) == 300  # cut before "xyz"


# -- one in-process server for the requests ---------------------------------------------------------

PORT = 8126
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def server(tiny_stores):
    import ray
    from ray import serve

    from endor_ray.serve import build_app
    from endor_ray.serve.app import KEEP_ALIVE_S

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT, "keep_alive_timeout_s": KEEP_ALIVE_S})
        serve.run(build_app({"store": str(tiny_stores["llama-gqa"]), "model_name": "tiny", "engine.gpu_memory": 0,
                             "scheduler.max_num_seqs": 8, "scheduler.max_waiting": 100}),
                  name="endor", route_prefix="/")
        yield str(tiny_stores["llama-gqa"])
    finally:
        serve.shutdown()
        ray.shutdown()


def call(path: str, body=None, method: str | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{BASE}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            raw = answer.read().decode()
            status = answer.status
    except urllib.error.HTTPError as error:
        raw, status = error.read().decode(), error.code
    try:
        return status, json.loads(raw) if raw else ""
    except json.JSONDecodeError:
        return status, raw


def refused(path: str, body, status: int = 400) -> dict:
    got, answer = call(path, body)
    assert got == status and isinstance(answer, dict) and set(answer["error"]) == {"message", "type", "param", "code"}, \
        (got, answer)
    return answer["error"]


def test_costly_requests_are_refused_naming_the_cap(server):
    from endor_ray.serve import limits

    error = refused("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(17)]})
    assert error["code"] == "too_many_stop_strings" and str(limits.MAX_STOP_STRINGS) in error["message"]
    error = refused("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stop": "x" * 257})
    assert error["code"] == "stop_string_too_long" and "256" in error["message"]
    error = refused("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {str(i): 1 for i in range(301)}})
    assert error["code"] == "too_many_logit_bias_entries" and "300" in error["message"]
    started = time.monotonic()
    error = refused("/v1/completions", {"prompt": ["Hi"] * 64, "n": 16, "max_tokens": 2})
    assert error["code"] == "too_many_sequences" and "1024 sequences" in error["message"] and "128" in error["message"]
    assert time.monotonic() - started < 5  # at once, before any tokenizing
    # larger than this server's whole queue (100): a 400 at once, not a 429 after the work
    error = refused("/v1/completions", {"prompt": ["Hi"] * 8, "n": 16, "max_tokens": 2})
    assert "queues at most 100" in error["message"]


def test_logit_bias_keys_must_be_token_ids_of_the_vocabulary(server):
    for key in ("-1", "49152", "1_0", " 7", "07", "abc", "9" * 30):
        error = refused("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {key: 5}})
        assert error["param"] == "logit_bias" and "token ids in [0, 49152)" in error["message"], key
    status, answer = call("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                              "logit_bias": {"1234": 100}})
    assert status == 200
    _, tokens = call("/tokenize", {"prompt": answer["choices"][0]["text"], "add_special_tokens": False})
    assert set(tokens["tokens"]) == {1234}  # the bias takes effect


def test_malformed_requests_are_4xx_with_an_openai_body(server):
    digits = "1" * 5000
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        body = {"/v1/completions": '{"prompt": "x", "max_tokens": %s}',
                "/v1/chat/completions": '{"messages": [{"role": "user", "content": "x"}], "n": %s}',
                "/tokenize": '{"prompt": "x", "model": %s}', "/detokenize": '{"tokens": [%s]}'}[path] % digits
        assert "4300 digits" in refused(path, body.encode())["message"], path
    assert "surrogate" in refused("/tokenize", b'{"\\ud800": 1}')["message"]
    assert "surrogate" in refused("/v1/completions", b'{"prompt": "x", "logit_bias": {"\\udc00": 1}}')["message"]
    assert refused("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2,
                                            "max_tokens": 2})["param"] == "top_logprobs"
    assert refused("/tokenize", {"prompt": "x", "model": "gpt-9"}, status=404)["code"] == "model_not_found"
    assert refused("/detokenize", {"tokens": [1], "model": "gpt-9"}, status=404)["code"] == "model_not_found"
    assert refused("/tokenize", {"prompt": "x", "add_special_tokens": "yes"})["param"] == "add_special_tokens"


def test_a_denormal_temperature_is_greedy(server):
    """temperature 1e-320 passed validation and failed in the pass (logits / 1e-320 = inf): a 500."""
    greedy = call("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    tiny = call("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 1e-320, "seed": 3})
    assert tiny[0] == greedy[0] == 200 and tiny[1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]


def test_tokenize_honours_add_special_tokens(server):
    from endor_ray.engine.engine import load_tokenizer
    from endor_ray.store.store import Store

    tokenizer = load_tokenizer(Store(server))
    for flag in (True, False):
        status, answer = call("/tokenize", {"prompt": "Hello there", "add_special_tokens": flag, "model": "tiny"})
        assert status == 200 and answer["tokens"] == tokenizer("Hello there", add_special_tokens=flag).input_ids


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_streamed_requests_and_every_status(server):
    from openai import OpenAI

    before = call("/metrics")[1]
    client = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
    streamed = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="Hi", max_tokens=5,
                                                                      temperature=0, stream=True) if c.choices]
    assert streamed
    call("/v1/nowhere", {})
    refused("/v1/completions", {"prompt": "Hi", "max_tokens": -1})
    after = call("/metrics")[1]
    assert (_metric(after, "endor_requests_total", route="/v1/completions", status="200")
            - _metric(before, "endor_requests_total", route="/v1/completions", status="200")) == 1
    assert (_metric(after, "endor_generation_tokens_total") - _metric(before, "endor_generation_tokens_total")) == 5
    assert (_metric(after, "endor_time_to_first_token_seconds_count")
            - _metric(before, "endor_time_to_first_token_seconds_count")) == 1
    assert _metric(after, "endor_requests_total", status="404") > _metric(before, "endor_requests_total", status="404")
    assert (_metric(after, "endor_requests_total", route="/v1/completions", status="400")
            - _metric(before, "endor_requests_total", route="/v1/completions", status="400")) == 1


def test_head_health_and_the_docs_behind_the_key(server):
    from ray import serve

    from endor_ray.serve import build_app

    assert call("/health", method="HEAD")[0] == 200
    serve.run(build_app({"store": server, "model_name": "locked", "engine": {"gpu_memory": 0}, "api_key": "k3y",
                         "protect_health": True}), name="locked", route_prefix="/locked")
    try:
        for path in ("/locked/docs", "/locked/openapi.json", "/locked/health", "/locked/metrics"):
            assert call(path)[0] == 401, path
            assert call(path, headers={"Authorization": "Bearer k3y"})[0] == 200, path
    finally:
        serve.delete("locked")


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server):
    import socket

    from endor_ray.serve.app import KEEP_ALIVE_S

    with socket.create_connection(("127.0.0.1", PORT), timeout=KEEP_ALIVE_S + 20) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        while connection.recv(65536):  # drain the rest of the answer; b"": the server closed it
            pass
        assert KEEP_ALIVE_S - 1 < time.monotonic() - started < KEEP_ALIVE_S + 15



GUARD_PORT = 8127
HEADER_TIMEOUT_S = 2.0


@pytest.fixture()
def guard(server):
    """`endor serve`'s public listener (`run_server` starts the same) in front of the module's Serve proxy."""
    from endor_ray.serve.connection_guard import ConnectionGuard

    guards = []

    def start(**options):
        guards.append(ConnectionGuard("127.0.0.1", GUARD_PORT, PORT, HEADER_TIMEOUT_S, **options))
        guards[-1].start()
        return f"http://127.0.0.1:{GUARD_PORT}"

    yield start
    for started in guards:
        started.close()


def _trickle(port: int, seconds: float) -> tuple[float, bytes]:
    """Send a request head one byte every 0.25 s for at most `seconds`: (seconds until the server
    answered or closed, what it sent; b"" and `seconds` if it still held the connection)."""
    import socket

    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 400
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.settimeout(0.25)
        started = time.monotonic()
        for byte in head:
            if time.monotonic() - started > seconds:
                return seconds, b""
            try:
                connection.sendall(bytes([byte]))
                answer = connection.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, b""
            return time.monotonic() - started, answer
    return seconds, b""


def test_a_client_trickling_headers_is_closed_after_the_header_timeout(server, guard):
    """Slowloris: Serve's proxy (uvicorn) held a connection whose headers trickle in for ever;
    through `endor serve`'s guard it is a 408 and closed at the header timeout, while a normal
    request still works."""
    held_s, answer = _trickle(PORT, HEADER_TIMEOUT_S + 3)  # Serve alone: the defect the guard closes
    assert answer == b"" and held_s >= HEADER_TIMEOUT_S + 3
    base = guard()
    closed_s, answer = _trickle(GUARD_PORT, HEADER_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert HEADER_TIMEOUT_S - 0.5 < closed_s < HEADER_TIMEOUT_S + 3
    with urllib.request.urlopen(f"{base}/health", timeout=60) as healthy:
        assert healthy.status == 200 and json.loads(healthy.read())["status"] in ("ok", "degraded")
    request = urllib.request.Request(f"{base}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "Hi", "max_tokens": 2, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=120) as streamed:
        assert streamed.status == 200 and b"data: [DONE]" in streamed.read()


def test_serve_proxy_routes_need_the_key_under_protect_health(server, guard):
    """/-/routes and /-/healthz (answered by Serve's proxy itself, before the app's key check) were
    open under --api-key --protect-health; through the guard they need the key."""
    def status(url: str, headers: dict | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(f"{BASE}/-/routes") == 200  # Serve alone: open to anyone
    base = guard(api_key="k3y", protect_health=True)
    for path in ("/-/routes", "/-/healthz"):
        assert status(f"{base}{path}") == 401, path
        assert status(f"{base}{path}", {"Authorization": "Bearer wrong"}) == 401, path
        assert status(f"{base}{path}", {"Authorization": "Bearer k3y"}) == 200, path
    assert status(f"{base}/v1/models") == 200  # the app's own routes: its own key check (this app has none)

def test_health_stays_200_while_a_shard_server_restarts(server):
    """A shard kill made /health 503 for seconds while every request succeeded."""
    import ray

    [shard] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "shard" in a["name"]]
    ray.kill(ray.get_actor(shard["name"], namespace=shard["namespace"]), no_restart=False)
    statuses = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body = call("/health")
        statuses.append((status, body.get("status") if isinstance(body, dict) else body))
        if statuses[-1] == (200, "ok") and len(statuses) > 3:
            break
        time.sleep(0.3)
    assert all(status == 200 for status, _ in statuses), statuses
    assert call("/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
