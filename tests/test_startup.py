"""`endor generate --in-process` imports nothing of the service stack (issue 24: start-up).

Ray alone costs seconds to import; the in-process path must not pay for it, nor for the HTTP front
(fastapi, uvicorn) or llguidance, which only a grammar uses. Checked in a fresh interpreter, where
the command's own imports are all that sys.modules holds. (triton is imported: torch._dynamo imports
it when it is installed, and transformers' masking_utils imports torch._dynamo.)
"""

from __future__ import annotations

import json
import subprocess
import sys

SERVICE_STACK = ("ray", "fastapi", "uvicorn", "starlette", "llguidance")

CHILD = """
import contextlib, io, json, sys
from endor_ray.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(["generate", sys.argv[1], "--in-process", "--prompt", "Hello", "--max-new-tokens", "2"])
print(json.dumps({"code": code, "packages": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def test_in_process_generate_imports_no_service_stack(tiny_stores, tmp_path):
    # cwd: a folder of nothing, so that the repository's top-level folders are not importable by name
    child = subprocess.run([sys.executable, "-c", CHILD, str(tiny_stores["llama-gqa"])], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert "transformers" in report["packages"]  # the check sees the command's imports (it really generated)
    assert not set(SERVICE_STACK) & set(report["packages"]), report["packages"]
