"""The batch job's input: found, read and checked whole on the driver before anything is written,
then handed to Ray Data.

JSON lines or Parquet, a file, a folder or a URI. A single file is Parquet if its name ends in
`.parquet`/`.pq`, else JSON lines (gzip and the other codecs pyarrow knows are read by their
suffix). A folder is read whole, files whose names start with `.` or `_` aside: all its files
must be of one format (`.parquet`/`.pq`, or `.jsonl`/`.json`/`.ndjson`, compressed or not); a
folder mixing the two, or holding other files, is refused naming them (reading both would make
the column rules of one format quietly apply to the other; silently skipping some would lose
rows). Two columns matter, renamed `id` (a string) and `prompt`; `endor_ray.jobs.rows` checks
each row, and `check_lengths` tokenizes every prompt (batched: ~2000 prompts in well under a
second) against the context the engine will use (`engine.prompts.check_prompt`), so a prompt
too long fails the job before its first part, not in the middle.

The checked (id, prompt) rows are what the job generates from: they live on the driver and go to
Ray Data as an in-memory dataset (`ray.data.from_arrow`), so the input is read exactly once.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from endor_ray.errors import ConfigError
from endor_ray.jobs.rows import Rows, RowChecker, read_jsonl, read_parquet

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".zst", ".lz4")
TOKENIZE_CHUNK = 1024  # prompts per tokenizer call (the fast tokenizer batches them in Rust)
BLOCK_ROWS = 4096  # rows per Ray Data block


def _format_of(name: str) -> str | None:
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if any(name.endswith(suffix + codec) for suffix in JSONL_SUFFIXES for codec in COMPRESSION_SUFFIXES):
        return "jsonl"
    return None


def input_files(location: str) -> tuple[list[str], str, bool]:
    """(paths, "jsonl" | "parquet", whether the input is a single file), or ConfigError."""
    import pyarrow.fs

    from endor_ray.jobs.parts import filesystem

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"input {location} does not exist")
    if info.type != pyarrow.fs.FileType.Directory:
        return [path], "parquet" if posixpath.basename(path).endswith(PARQUET_SUFFIXES) else "jsonl", True
    entries = sorted((entry for entry in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                      if entry.type == pyarrow.fs.FileType.File and not entry.base_name.startswith((".", "_"))),
                     key=lambda entry: entry.path)
    if not entries:
        raise ConfigError(f"input folder {location} holds no files")
    by_format: dict[str | None, list[str]] = {}
    for entry in entries:
        by_format.setdefault(_format_of(entry.base_name), []).append(entry.path)
    if None in by_format:
        raise ConfigError(f"input folder {location} holds files that are neither JSON lines nor Parquet: "
                          f"{_names(by_format[None], path)}; move them out or rename them")
    if len(by_format) > 1:
        raise ConfigError(f"input folder {location} mixes JSON lines ({_names(by_format['jsonl'], path)}) and Parquet "
                          f"({_names(by_format['parquet'], path)}); give one format per folder")
    [(kind, paths)] = by_format.items()
    return paths, kind, False


def _names(paths: list[str], root: str, shown: int = 4) -> str:
    names = [posixpath.relpath(p, root) for p in paths]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def read_rows(location: str, prompt_column: str = "prompt", id_column: str = "id") -> Rows:
    """Every row of the input, checked (module docstring); ConfigError naming file, line and id."""
    from endor_ray.jobs.parts import filesystem

    fs, _ = filesystem(location)
    paths, kind, single = input_files(location)
    checker = RowChecker(prompt_column, id_column)
    for path in paths:
        name = location if single else path
        try:
            if kind == "parquet":
                with fs.open_input_file(path) as source:
                    read_parquet(checker, source, name)
            else:
                with fs.open_input_stream(path, compression="detect") as stream:
                    read_jsonl(checker, stream, name, single)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"cannot read the input {name}: {str(exc).splitlines()[0][:200]}") from None
    if not checker.rows.ids:
        raise ConfigError(f"the input {location} holds no prompts")
    return checker.rows


def check_lengths(rows: Rows, tokenizer, max_new_tokens: int, max_context: int) -> None:
    """Every prompt tokenized once and checked against the context; ConfigError naming the first too long."""
    from endor_ray.engine.prompts import check_prompt

    for start in range(0, len(rows.prompts), TOKENIZE_CHUNK):
        chunk = rows.prompts[start:start + TOKENIZE_CHUNK]
        for offset, token_ids in enumerate(tokenizer(chunk).input_ids):
            try:
                check_prompt(tokenizer, token_ids, max_new_tokens, max_context)
            except ConfigError as exc:
                index = start + offset
                raise ConfigError(f"the input {rows.places[index]} (id {rows.ids[index]!r}): {exc}") from None


def prompts_dataset(rows: Rows):
    """The checked rows as a Ray Dataset of {"id": string, "prompt": string} blocks."""
    import ray

    table = rows.table()
    return ray.data.from_arrow([table.slice(start, BLOCK_ROWS) for start in range(0, table.num_rows, BLOCK_ROWS)])


def todo_dataset(dataset, done: set[str]):
    """The rows whose ids are not committed yet."""
    if not done:
        return dataset
    done_ids = pa.array(sorted(done), type=pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done_ids)))

    return dataset.map_batches(keep, batch_format="pyarrow")
