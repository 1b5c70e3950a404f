"""The batch job's input as a Ray Dataset: read lazily, checked whole before any generation.

JSON lines or Parquet, a file, a folder or a URI (the format from the file names: `.parquet`/`.pq`
is Parquet, anything else JSON lines). Two columns matter, renamed `id` (cast to string) and
`prompt`; the check reads those columns once, on the driver, and refuses the input in one line if
a column is missing, a prompt is empty or not a string, an id is missing, or two rows share an id
(the job resumes by id, so they must be unique across the whole input).
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from endor_ray.errors import ConfigError

PARQUET_SUFFIXES = (".parquet", ".pq")


def _is_parquet(location: str) -> bool:
    import pyarrow.fs

    from endor_ray.jobs.parts import filesystem

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"input {location} does not exist")
    if info.type == pyarrow.fs.FileType.Directory:
        names = [entry.base_name for entry in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                 if entry.type == pyarrow.fs.FileType.File and not entry.base_name.startswith((".", "_"))]
        if not names:
            raise ConfigError(f"input folder {location} holds no files")
        return all(name.endswith(PARQUET_SUFFIXES) for name in names)
    return posixpath.basename(path).endswith(PARQUET_SUFFIXES)


def prompts_dataset(location: str, prompt_column: str = "prompt", id_column: str = "id"):
    """(Dataset of {"id": string, "prompt": string}, number of rows), checked; ConfigError otherwise."""
    import ray

    try:
        parquet = _is_parquet(location)
        dataset = ray.data.read_parquet(location) if parquet else ray.data.read_json(location)
        names = dataset.schema().names
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray Data and Arrow raise assorted errors for unreadable input
        raise ConfigError(f"cannot read the input {location}: {_first_line(exc)}") from None
    for column, option in ((prompt_column, "--prompt-column"), (id_column, "--id-column")):
        if column not in names:
            raise ConfigError(f"the input {location} has no {column!r} column (its columns: {', '.join(names)}); "
                              f"name it with {option}" + (" (the job resumes by id: every row needs one)"
                                                          if column == id_column else ""))

    def normalize(batch: pa.Table) -> pa.Table:
        ids = batch.column(id_column)
        if pa.types.is_floating(ids.type):
            ids = pc.cast(ids, pa.int64())
        return pa.table({"id": pc.cast(ids, pa.string()), "prompt": batch.column(prompt_column)})

    dataset = dataset.select_columns([id_column, prompt_column]).map_batches(normalize, batch_format="pyarrow")
    total = _check(dataset, location)
    return dataset, total


def _check(dataset, location: str) -> int:
    seen: set[str] = set()
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=65536):
            ids, prompts = batch.column("id"), batch.column("prompt")
            if ids.null_count:
                raise ConfigError(f"the input {location} has a row without an id (the job resumes by id: every row "
                                  "needs one)")
            if not pa.types.is_string(prompts.type) and not pa.types.is_large_string(prompts.type):
                raise ConfigError(f"the input {location}: prompts must be strings, got {prompts.type}")
            empty = pc.or_(pc.is_null(prompts), pc.equal(pc.utf8_length(prompts), 0))
            if pc.any(empty).as_py():
                bad = ids.filter(empty)[0].as_py()
                raise ConfigError(f"the input {location}: the prompt of id {bad!r} is empty")
            for prompt_id in ids.to_pylist():
                if prompt_id in seen:
                    raise ConfigError(f"the input {location}: id {prompt_id!r} appears twice (ids must be unique)")
                seen.add(prompt_id)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. JSON whose id column mixes numbers and strings
        raise ConfigError(f"cannot read the input {location}: {_first_line(exc)}") from None
    if not seen:
        raise ConfigError(f"the input {location} holds no prompts")
    return len(seen)


def _first_line(exc: BaseException) -> str:
    """The cause of a Ray task error (e.g. Arrow's JSON parse error), in one line."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def todo_dataset(dataset, done: set[str]):
    """The rows whose ids are not committed yet."""
    if not done:
        return dataset
    done_ids = pa.array(sorted(done), type=pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done_ids)))

    return dataset.map_batches(keep, batch_format="pyarrow")
