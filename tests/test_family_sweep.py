"""Every supported family through the Ray side: Serve (the real `openai` client) and the batch job.

The Ray side ships layer units and runs the engine that tests/test_families.py and tests/test_moe.py
check family by family, so the default suite runs it on the families whose units differ most
(tests/test_moe_service.py: Mixtral through Serve; Mixtral, Qwen2-MoE, Gemma 3 and Phi-3 through
the job). This sweep runs all of them, dense and MoE, each converted with the plain `endor convert`
settings' calibrated method where it calibrates (Wanda at 50%), through one local Ray: a Serve app per
family answering a greedy completion, then the batch job over four prompts, every answer compared
with transformers' own `generate` on the store's exported checkpoint. About 20-30 s a family, so it
is not in the default run: `pytest -m sweep tests/test_family_sweep.py` (the closing notes say when
it last passed).
"""

import json

import pytest
from test_families import FAMILIES as DENSE_FAMILIES
from test_families import PROMPTS, cut, family_checkpoint, transformers_greedy
from test_moe import FAMILIES as MOE_FAMILIES

from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.store.export import export_checkpoint
from endor_ray.store.store import Store

pytestmark = pytest.mark.sweep
PORT = 8137
NEW_TOKENS = 5
SWEPT = {**{name: fields for name, (fields, _) in DENSE_FAMILIES.items()}, **MOE_FAMILIES}


@pytest.fixture(scope="module")
def local_serve():
    import ray
    from ray import serve

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("family", list(SWEPT))
def test_family_serves_and_runs_as_a_batch_job(local_serve, tmp_path, family):
    from openai import OpenAI
    from ray import serve
    from transformers import AutoTokenizer

    from endor_ray.jobs.generate import main as job_main
    from endor_ray.jobs.parts import PartFolder
    from endor_ray.serve import build_app

    checkpoint = family_checkpoint(tmp_path / "ckpt", SWEPT[family])
    config = ConvertConfig(method="wanda", sparsity=0.5, calib_samples=2, calib_seq_len=16)
    store = convert(str(checkpoint), tmp_path / "store", config, progress=False)
    exported = export_checkpoint(Store(str(store)), tmp_path / "exported", progress=False)
    expected = cut(transformers_greedy(exported, NEW_TOKENS), [NEW_TOKENS] * len(PROMPTS))
    assert all(expected)

    app = build_app({"store": str(store), "model_name": family, "engine.gpu_memory": 0, "engine.device": "cpu"})
    serve.run(app, name=f"sweep-{family}", route_prefix="/")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", timeout=120, max_retries=0)
        answer = client.completions.create(model=family, prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
        assert answer.choices[0].text == AutoTokenizer.from_pretrained(exported).decode(expected[0])
    finally:
        serve.delete(f"sweep-{family}")

    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": str(idx), "prompt": prompt}) + "\n" for idx, prompt in enumerate(PROMPTS)))
    assert job_main(["--store", str(store), "--input", str(source), "--output", str(tmp_path / "out"), "--max-new-tokens",
                     str(NEW_TOKENS), "--gpu-memory", "0", "--device", "cpu", "--batch-size", "2"]) == 0
    rows = PartFolder(str(tmp_path / "out")).read_all().to_pylist()
    assert {int(row["id"]): row["token_ids"] for row in rows} == dict(enumerate(expected)) and len(rows) == len(PROMPTS)
