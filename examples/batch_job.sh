#!/usr/bin/env bash
# Batch generation with the endor-ray job: a JSONL of prompts in, a Parquet of completions out.
#
#   examples/batch_job.sh STORE                 # runs the job here (a local Ray is started for it)
#   examples/batch_job.sh STORE http://HEAD:8265   # submits it to a running cluster with `ray job submit`
#
# Run it twice: the second run finds every id already in the output and generates nothing.
# (For a cluster on this machine: cluster/local-cluster.sh start 2, then pass http://127.0.0.1:8265.)
set -euo pipefail
store=$(realpath "${1:?usage: examples/batch_job.sh STORE [DASHBOARD_URL]}")
dashboard=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
work=${WORK:-$here/examples/out}
mkdir -p "$work"
cat > "$work/prompts.jsonl" <<'PROMPTS'
{"id": "france", "prompt": "The capital of France is"}
{"id": "sea", "prompt": "The sea is"}
{"id": "story", "prompt": "Once upon a time"}
{"id": "code", "prompt": "def add(a, b):"}
PROMPTS
args=(--store "$store" --input "$work/prompts.jsonl" --output "$work/completions" --max-new-tokens 16)
if [ -z "$dashboard" ]; then
    "$python" -m endor_ray.jobs.generate "${args[@]}"
else
    # The job's driver runs on the head, with the python that started Ray there: name it.
    "$(dirname "$python")/ray" job submit --address "$dashboard" --working-dir "$work" -- \
        "$python" -m endor_ray.jobs.generate "${args[@]}"
fi
"$python" - "$work/completions" <<'SHOW'
import sys
import pyarrow.parquet as pq
for row in pq.read_table(sys.argv[1]).to_pylist():
    print(f"{row['id']:>7}: {row['prompt']}{row['text']!r}")
SHOW
