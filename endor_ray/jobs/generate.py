"""Batch generation job: prompts in (JSONL or Parquet), completions out (Parquet), resumable.

    ray job submit --working-dir . -- python -m endor_ray.jobs.generate \\
        --store s3://bucket/stores/llama-2-70b-w50 --input prompts.jsonl --output /data/out.parquet \\
        [--max-new-tokens 64] [--temperature 0] [--top-p 1] [--seed S] [--batch-size 16] \\
        [--address ADDR] [--gpu-memory SIZE] [--workers N] [--prompt-column prompt] [--id-column id]

Input: JSONL (one object per line: {"prompt": "...", "id": "..."}) or Parquet (by suffix .parquet/.pq).
A row without an id gets its row number (from 0) as id. Ids must be unique.

Output: Parquet with columns id, prompt, text, token_ids (list<int64>), finish_reason, num_tokens.
If OUT exists, its ids are skipped and new rows appended. Every --batch-size finished rows the
whole table is written to a temporary file next to OUT and renamed onto it, so OUT is always a
complete file; rows appear in the order they finish, and an interrupted job keeps the rows that
had finished. The GPU worker batches continuously: as a sequence finishes, the next prompt takes
its place in the following pass.

Inside a Ray job (RAY_ADDRESS set) the job joins that cluster; with --address it joins that one;
otherwise a local single-node Ray is started and stopped. One pass over the weights serves a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from endor_ray.errors import ConfigError, EndorError

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()), ("num_tokens", pa.int64()),
])


def read_prompts(path: Path, prompt_column: str = "prompt", id_column: str = "id") -> list[tuple[str, str]]:
    """[(id, prompt)] from a JSONL or Parquet file, validated (unique ids, string prompts)."""
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    if path.suffix in (".parquet", ".pq"):
        try:
            records = pq.read_table(path).to_pylist()
        except pa.ArrowException as exc:
            raise ConfigError(f"{path} is not a readable Parquet file ({exc})") from None
        where = [f"row {row_idx}" for row_idx in range(len(records))]
    else:
        records, where = [], []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is neither UTF-8 JSONL nor .parquet ({exc})") from None
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            where.append(f"line {line_no}")
    if not records:
        raise ConfigError(f"{path} holds no prompts")
    prompts, seen = [], {}
    for row_idx, (record, place) in enumerate(zip(records, where)):
        prompt, given_id = record.get(prompt_column), record.get(id_column)
        if prompt_column not in record:
            raise ConfigError(f"{path} {place}: no {prompt_column!r} field")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"{path} {place}: {prompt_column!r} must be a non-empty string, got {prompt!r}")
        if given_id is not None and (isinstance(given_id, bool) or not isinstance(given_id, (str, int))):
            raise ConfigError(f"{path} {place}: {id_column!r} must be a string or an integer, got {given_id!r}")
        prompt_id = str(row_idx if given_id is None else given_id)
        if prompt_id in seen:
            raise ConfigError(f"{path} {place}: duplicate id {prompt_id!r} (first at {seen[prompt_id]})")
        seen[prompt_id] = place
        prompts.append((prompt_id, prompt))
    return prompts


def read_done(output: Path) -> pa.Table:
    """The rows already in OUT (an empty table when it does not exist)."""
    if not output.exists():
        return OUTPUT_SCHEMA.empty_table()
    try:
        table = pq.read_table(output)
        return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    except (pa.ArrowException, KeyError) as exc:
        raise ConfigError(f"{output} exists but is not this job's output ({exc}); move it away or pick "
                          "another --output") from None


def write_atomically(table: pa.Table, output: Path) -> None:
    """Write `table` to a temporary file next to `output`, then rename it onto `output`."""
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")  # same folder: the rename is atomic
    try:
        pq.write_table(table, staging)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)


def in_submitted_job() -> bool:
    """Whether this process is the entrypoint of a `ray job submit` (its directory is a temporary
    copy of --working-dir that Ray deletes afterwards)."""
    return "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")


def check_output(args: argparse.Namespace) -> None:
    """Fail before any work where the output would be lost."""
    if in_submitted_job() and not Path(args.output).is_absolute():
        raise ConfigError(
            f"--output {args.output} is relative: inside a Ray job it would be written into the job's temporary "
            f"copy of the working directory ({Path.cwd()}), which Ray deletes; give an absolute path on a disk "
            "the head node keeps")


def check_store(args: argparse.Namespace) -> None:
    """Fail before starting the service where the store cannot be read from this node."""
    from endor_ray.errors import StoreError
    from endor_ray.store import Store

    try:
        Store(args.store)
    except StoreError as exc:
        hint = ""
        if in_submitted_job() and "://" not in args.store and not Path(args.store).is_absolute():
            hint = (" (inside a Ray job a relative store path is read from the uploaded working directory, which "
                    "leaves out what .gitignore names, such as stores/: give an absolute path or a URI)")
        raise StoreError(f"{exc}{hint}") from None


def run(args: argparse.Namespace) -> None:
    check_output(args)
    prompts = read_prompts(Path(args.input), args.prompt_column, args.id_column)
    output = Path(args.output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    table = read_done(output)
    done_ids = set(table.column("id").to_pylist())
    todo = [(prompt_id, prompt) for prompt_id, prompt in prompts if prompt_id not in done_ids]
    print(f"endor-job: {len(prompts)} prompts, {len(prompts) - len(todo)} already in {output}, "
          f"{len(todo)} to generate", file=sys.stderr, flush=True)
    if not todo:
        return
    check_store(args)

    from endor_ray.engine.engine import EngineConfig
    from endor_ray.engine.sampling import SamplingParams
    from endor_ray.engine.scheduler import SchedulerConfig
    from endor_ray.service.driver import ClusterConfig, connect

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    engine_config = EngineConfig(device=args.device, gpu_memory=args.gpu_memory, host_memory=args.host_memory,
                                 prefetch_depth=args.prefetch)
    address = args.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    cluster = ClusterConfig(address=address, num_workers=args.workers, shard_memory=args.shard_memory,
                            timeout_s=args.timeout)
    # The worker's scheduler keeps --batch-size sequences in every pass: as one finishes, the next
    # prompt takes its place, so no pass waits for the slowest sequence of a batch.
    scheduler = SchedulerConfig(max_num_seqs=args.batch_size)
    start, new_tokens, finished, pending = time.monotonic(), 0, 0, []
    chunk = max(4 * args.batch_size, 64)  # prompts per request: enough to keep the batch full
    with connect(args.store, engine_config, cluster, scheduler=scheduler) as service:
        try:
            for chunk_start in range(0, len(todo), chunk):
                batch = todo[chunk_start:chunk_start + chunk]
                for event in service.stream([prompt for _, prompt in batch], params):
                    if "completion" not in event:
                        continue
                    (prompt_id, prompt), completion = batch[event["index"]], event["completion"]
                    pending.append({"id": prompt_id, "prompt": prompt, "text": completion["text"],
                                    "token_ids": completion["token_ids"],
                                    "finish_reason": completion["finish_reason"],
                                    "num_tokens": len(completion["token_ids"])})
                    new_tokens += len(completion["token_ids"])
                    if len(pending) >= args.batch_size:
                        table, finished = _flush(table, pending, output, finished)
                        pending = []
                        print(f"endor-job: {len(prompts) - len(todo) + finished}/{len(prompts)} rows done, "
                              f"{new_tokens / (time.monotonic() - start):.2f} tokens/s", file=sys.stderr, flush=True)
        finally:  # finished rows are kept, whatever stopped the job
            if pending:
                table, finished = _flush(table, pending, output, finished)
                print(f"endor-job: {len(prompts) - len(todo) + finished}/{len(prompts)} rows done",
                      file=sys.stderr, flush=True)
    print(f"endor-job: done: generated {len(todo)} new rows, {new_tokens} tokens at "
          f"{new_tokens / max(time.monotonic() - start, 1e-9):.2f} tokens/s (with start-up); "
          f"{table.num_rows} rows in {output}", file=sys.stderr, flush=True)


def _flush(table: pa.Table, rows: list[dict], output: Path, finished: int) -> tuple[pa.Table, int]:
    table = pa.concat_tables([table, pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)])
    write_atomically(table, output)
    return table, finished + len(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m endor_ray.jobs.generate",
                                     description="Generate completions for a file of prompts (resumable).")
    parser.add_argument("--store", required=True, help="store path or URI")
    parser.add_argument("--input", required=True, help="prompts: JSONL, or Parquet (.parquet/.pq)")
    parser.add_argument("--output", required=True, help="Parquet file to create or resume")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per pass over the weights (kept full as sequences finish), and rows per write")
    parser.add_argument("--address", default=None, help="Ray cluster (default: the job's, else a local Ray)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--gpu-memory", default=None, help="device tier: a size (8GiB) or a layer count (12)")
    parser.add_argument("--host-memory", default=None, help="host memory for compressed layers (64GiB)")
    parser.add_argument("--prefetch", type=int, default=2, help="layers fetched ahead")
    parser.add_argument("--workers", type=int, default=1, help="GPU worker replicas")
    parser.add_argument("--shard-memory", default=None, help="host memory per node for shard servers")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per batch and for start-up")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--id-column", default="id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from endor_ray.service.ray_session import use_loopback_ray, use_token_if_present

    if args.address is None and not os.environ.get("RAY_ADDRESS"):
        use_loopback_ray()  # the local Ray this job starts stays on 127.0.0.1
    else:
        use_token_if_present()  # a cluster started with Ray's defaults wants a token
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        run(args)
    except EndorError as exc:
        print(f"endor-job: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"endor-job: interrupted; the rows finished so far are in {args.output}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
