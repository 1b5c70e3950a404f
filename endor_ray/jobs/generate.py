"""Batch generation on Ray Data: prompts in (JSONL or Parquet: a file, a folder, a URI), a folder of
Parquet parts out, resumable in O(rows).

    python -m endor_ray.jobs.generate --store STORE --input prompts.jsonl --output out/ \\
        [--workers 2] [--batch-size 64] [--max-new-tokens 64] [--temperature 0] [--top-p 1] [--seed S]
        [--json-schema schema.json]
        [the engine, scheduler and cluster options of `endor generate`: --gpu-memory, --prefetch-depth, ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m endor_ray.jobs.generate \\
        --store s3://bucket/stores/model --input s3://bucket/prompts/ --output s3://bucket/out/

Input: JSON lines (one object per line) or Parquet, with an id column (`--id-column`, default
`id`: strings or integers, unique across the whole input; the job resumes by id) and a prompt
column (`--prompt-column`, default `prompt`); a single JSON lines file without ids uses its line
numbers (and says so). Every row is read and checked on the driver before anything is written
(`endor_ray.jobs.dataset`, `endor_ray.jobs.rows`): a bad row, a prompt too long for the context
or a folder mixing formats is one line naming the file, line or row and id, and no `_job.json` or
part appears.

Output: a folder of Parquet parts (columns id, prompt, text, token_ids, finish_reason,
num_tokens), each written whole as its batch finishes (`endor_ray.jobs.parts`): a rerun, or a run
after a crash or a kill -9 at any moment, skips the ids already committed, without rewriting
anything, and a part half-written by a killed run never counts. At the end, `_summary.json`
beside the parts holds the totals. Rows appear in the order they finish.

How it runs: the driver starts the endor-ray service once (shard servers, `--workers` GPU
workers) and Ray Data streams the prompts through a pool of small actors (`map_batches`), each
checking its batches' prompts (tokenized there, once) and sending their token ids to one GPU worker, whose engine batches continuously across all the
batches it receives; progress is Ray Data's (rows, rows/s).

Inside a Ray job (`ray job submit`) it joins that cluster; with --address that one; otherwise a
local Ray is started and stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from endor_ray.errors import ConfigError, EndorError
from endor_ray.jobs.config import JobConfig, default_of, job_config
from endor_ray.jobs.parts import OUTPUT_SCHEMA, PartFolder


def in_submitted_job() -> bool:
    """Whether this process is the entrypoint of a `ray job submit` (its directory is a temporary
    copy of --working-dir that Ray deletes afterwards)."""
    return "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")


def check_output(config: JobConfig) -> None:
    """Fail before any work where the output would be lost."""
    if in_submitted_job() and "://" not in config.output and not os.path.isabs(config.output):
        raise ConfigError(
            f"--output {config.output} is relative: inside a Ray job it would be written into the job's temporary "
            f"copy of the working directory ({os.getcwd()}), which Ray deletes; give an absolute path on a disk "
            "the head node keeps, or an object-store URI")


def check_store(config: JobConfig):
    """The opened Store; fails before starting the service where it cannot be read from this node."""
    from endor_ray.errors import StoreError
    from endor_ray.store import Store

    try:
        return Store(config.store)
    except StoreError as exc:
        hint = ""
        if in_submitted_job() and "://" not in config.store and not os.path.isabs(config.store):
            hint = (" (inside a Ray job a relative store path is read from the uploaded working directory, which "
                    "leaves out what .gitignore names, such as stores/: give an absolute path or a URI)")
        raise StoreError(f"{exc}{hint}") from None


class GenerateBatches:
    """A Ray Data map actor: checks each batch's prompts (`check_prompt`: tokenized here, once, against
    the engine's context) and sends their token ids to its GPU worker, commits the finished rows as
    one part, and returns one row of counts for the driver's totals."""

    def __init__(self, workers: list, params: list, output: str, timeout_s: float, store: str):
        import ray

        from endor_ray.engine.engine import load_tokenizer
        from endor_ray.engine.prompts import context_limit
        from endor_ray.store import Store

        self.params, self.folder, self.timeout_s = params, PartFolder(output), timeout_s
        # Spread the map actors over the GPU workers (each worker batches all it receives)
        self.worker = workers[hash(ray.get_runtime_context().get_actor_id()) % len(workers)]
        opened = Store(store)
        self.tokenizer, self.max_context = load_tokenizer(opened), context_limit(opened.config)

    def prompt_ids(self, prompt_id: str, prompt: str) -> list[int]:
        from endor_ray.engine.prompts import check_prompt

        try:
            return check_prompt(self.tokenizer, prompt, self.params[0].max_new_tokens, self.max_context)
        except ConfigError as exc:
            raise ConfigError(f"the prompt of id {prompt_id!r}: {exc}") from None

    def __call__(self, batch):
        import pyarrow as pa
        import ray

        ids, prompts = batch.column("id").to_pylist(), batch.column("prompt").to_pylist()
        prompt_ids = [self.prompt_ids(prompt_id, prompt) for prompt_id, prompt in zip(ids, prompts)]
        # Token ids, not text: the GPU worker tokenizes nothing again (its check of ids is free)
        result = ray.get(self.worker.generate.remote(prompt_ids, [self.params[0]] * len(prompts)), timeout=self.timeout_s)
        rows = [{"id": prompt_id, "prompt": prompt, "text": c["text"], "token_ids": c["token_ids"],
                 "finish_reason": c["finish_reason"], "num_tokens": len(c["token_ids"])}
                for prompt_id, prompt, c in zip(ids, prompts, result["completions"])]
        self.folder.commit(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
        stats = result["stats"]
        return pa.table({"rows": [len(rows)], "tokens": [stats["new_tokens"]], "passes": [stats["passes"]],
                         "mean_sequences_per_pass": [stats["mean_sequences_per_pass"]],
                         "bytes_to_device_per_pass": [float(stats["bytes_to_device_per_pass"])]})


def check_input(config: JobConfig):
    """Every row read and checked, lengths included (`endor_ray.jobs.dataset`), before anything is written."""
    from endor_ray.engine.engine import load_tokenizer
    from endor_ray.engine.prompts import context_limit
    from endor_ray.jobs.dataset import check_lengths, read_rows

    rows = read_rows(config.input, config.prompt_column, config.id_column)
    if rows.ids_from_line_numbers:
        print(f"endor-job: {config.input} has no {config.id_column!r} field: each row's id is its line number (the "
              "first line is id '1'); a rerun resumes by them, so keep the lines in place (appending is fine)",
              file=sys.stderr, flush=True)
    store = check_store(config)
    started = time.monotonic()
    check_lengths(rows, load_tokenizer(store), config.max_new_tokens, context_limit(store.config))
    print(f"endor-job: {len(rows.ids)} prompts checked (tokenizer loaded, every prompt tokenized: "
          f"{time.monotonic() - started:.2f} s)",
          file=sys.stderr, flush=True)
    return rows


def run(config: JobConfig) -> dict[str, Any]:
    import ray

    from endor_ray.jobs.dataset import prompts_dataset, todo_dataset
    from endor_ray.service.ray_session import init_ray

    check_output(config)
    rows = check_input(config)  # before Ray starts and before the output folder is touched
    params = config.sampling
    folder = PartFolder(config.output)
    job = {"store": config.store, "sampling": {"max_new_tokens": config.max_new_tokens,
                                               "temperature": config.temperature, "top_p": config.top_p,
                                               "seed": config.seed}, "schema": 1}
    if config.json_schema is not None:  # a rerun must follow the same schema (its content, not its path)
        job["sampling"]["json_schema"] = config.schema
    address = config.cluster.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    started_ray = init_ray(address, config.cluster.timeout_s)
    try:
        dataset, total = prompts_dataset(rows), len(rows.ids)
        folder.claim(job)
        done = folder.done_ids()
        print(f"endor-job: {total} prompts, {len(done)} already in {config.output}, {total - len(done)} to generate",
              file=sys.stderr, flush=True)
        summary = {"rows_total": total, "rows_skipped": len(done), "rows_generated": 0, "tokens": 0}
        if total > len(done):
            summary.update(generate(config, todo_dataset(dataset, done), params, folder))
        folder.write_summary(summary)
        print(f"endor-job: done: {summary['rows_generated']} new rows, {summary['tokens']} tokens"
              + (f" at {summary['tokens_per_s']:.1f} tokens/s, {summary['mean_sequences_per_pass']:.1f} sequences per pass"
                 if summary["rows_generated"] else "") + f"; parts in {config.output}", file=sys.stderr, flush=True)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def generate(config: JobConfig, todo, params, folder: PartFolder) -> dict[str, Any]:
    import ray

    from endor_ray.service.driver import connect

    batch_size, num_workers, timeout_s = config.scheduler.max_num_seqs, config.cluster.num_workers, config.cluster.timeout_s
    started = time.monotonic()
    totals = {"rows_generated": 0, "tokens": 0, "passes": 0, "weighted_sequences": 0.0, "bytes": 0.0}
    # The driver is on the cluster already (run() joined it), so connect() uses that one
    with connect(config.store, config.engine, config.cluster, scheduler=config.scheduler) as service:
        # Two map actors per GPU worker, batches of twice a pass: while one batch is being committed
        # the worker already runs the other's sequences, so its passes stay full.
        mapped = todo.map_batches(
            GenerateBatches, batch_size=2 * batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2 * num_workers),
            num_cpus=0, fn_constructor_kwargs={"workers": service.workers, "params": [params],
                                               "output": config.output, "timeout_s": timeout_s,
                                               "store": config.store})
        for counts in mapped.iter_rows():
            totals["rows_generated"] += counts["rows"]
            totals["tokens"] += counts["tokens"]
            totals["passes"] += counts["passes"]
            totals["weighted_sequences"] += counts["mean_sequences_per_pass"] * counts["passes"]
            totals["bytes"] += counts["bytes_to_device_per_pass"] * counts["passes"]
    wall = time.monotonic() - started
    passes = max(totals["passes"], 1)
    return {"rows_generated": totals["rows_generated"], "tokens": totals["tokens"], "wall_s": wall,
            "rows_per_s": totals["rows_generated"] / wall, "tokens_per_s": totals["tokens"] / wall,
            # each batch's figures over the passes it ran in (batches share passes: no total count of passes)
            "mean_sequences_per_pass": totals["weighted_sequences"] / passes,
            "bytes_to_device_per_pass": totals["bytes"] / passes, "workers": num_workers}


def build_parser() -> argparse.ArgumentParser:
    from endor_ray.utils.options import add_options, sections_of

    parser = argparse.ArgumentParser(prog="python -m endor_ray.jobs.generate",
                                     description="Batch generation with endor-ray on Ray Data (resumable).")
    parser.add_argument("--store", required=True, help="store path or URI (readable from every node)")
    parser.add_argument("--input", required=True, help="JSONL or Parquet: a file, a folder, or a URI")
    parser.add_argument("--output", required=True, help="output folder (or URI) of Parquet parts")
    parser.add_argument("--max-new-tokens", type=int, default=default_of("max_new_tokens"))
    parser.add_argument("--temperature", type=float, default=default_of("temperature"))
    parser.add_argument("--top-p", type=float, default=default_of("top_p"))
    parser.add_argument("--seed", type=int, default=default_of("seed"))
    parser.add_argument("--prompt-column", default=default_of("prompt_column"))
    parser.add_argument("--id-column", default=default_of("id_column"))
    parser.add_argument("--json-schema", default=default_of("json_schema"), metavar="FILE",
                        help="a JSON schema file: every row's output is JSON valid against it (strict)")
    # --batch-size (scheduler.max_num_seqs) also sizes the Ray Data batches; --timeout (cluster.timeout_s)
    # bounds the start-up and each batch.
    add_options(parser, sections_of(JobConfig))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = job_config(args)
    except EndorError as exc:
        print(f"endor-job: error: {exc}", file=sys.stderr)
        return 1
    from endor_ray.service.ray_session import use_loopback_ray, use_token_if_present

    if config.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        use_loopback_ray()  # the local Ray this job starts stays on 127.0.0.1
    else:
        use_token_if_present()  # a cluster started with Ray's defaults wants a token
    try:
        run(config)
    except EndorError as exc:
        print(f"endor-job: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"endor-job: interrupted; the parts committed so far are in {config.output}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
