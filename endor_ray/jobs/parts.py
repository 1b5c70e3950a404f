"""The batch job's output: a folder of Parquet parts, each written whole or not at all.

    OUT/_job.json                 what made these parts: store, sampling parameters, schema
    OUT/part-<uuid>.parquet       committed parts (rows id, prompt, text, token_ids, finish_reason, num_tokens)
    OUT/_summary.json             the last run's totals (rows, tokens, tokens/s, sequences per pass, bytes)
    OUT/_tmp/...                  parts being written (local folders): ignored, removed by the next run

A part is committed when it appears under its final name: on a local disk it is written under
`_tmp/` and renamed (atomic); on an object store (`s3://`, `gs://`) it is written with one PUT
under its final name (an object appears whole or not at all). So whatever kills a run, the
committed parts hold each finished row exactly once, and a rerun skips their ids by reading the
`id` column of the parts (O(rows), nothing rewritten). A folder written by a different job
(another store or other sampling parameters, per `_job.json`) is refused before any work.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from endor_ray.errors import ConfigError

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()), ("num_tokens", pa.int64()),
])
JOB_FILE, SUMMARY_FILE, TMP_DIR = "_job.json", "_summary.json", "_tmp"


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(file system, path) of a local folder or an object-store URI."""
    try:
        if "://" in location:
            return pyarrow.fs.FileSystem.from_uri(location)
        import os

        return pyarrow.fs.LocalFileSystem(), os.path.abspath(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise ConfigError(f"cannot open the output location {location}: {exc}") from None


class PartFolder:
    """An output folder: its job record, committed parts, and new parts."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.root = filesystem(location)
        self.local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def claim(self, job: dict[str, Any]) -> None:
        """Record this job in the folder, or refuse a folder that holds another job's parts."""
        try:
            self.fs.create_dir(self.root, recursive=True)
            info = self.fs.get_file_info(self._path(JOB_FILE))
            if info.type == pyarrow.fs.FileType.File:
                with self.fs.open_input_stream(self._path(JOB_FILE)) as f:
                    recorded = json.loads(f.read())
                if recorded != job:
                    changed = sorted(key for key in set(job) | set(recorded) if job.get(key) != recorded.get(key))
                    raise ConfigError(f"{self.location} holds the parts of a different job ({', '.join(changed)} "
                                      "differ); use another output folder, or the same store and parameters")
            else:
                if self.committed_files():
                    raise ConfigError(f"{self.location} holds Parquet parts but no {JOB_FILE}: not this job's output")
                self._write_bytes(JOB_FILE, json.dumps(job, indent=1, sort_keys=True).encode())
            if self.local:  # parts a killed run was writing
                self.fs.delete_dir_contents(self._path(TMP_DIR), missing_dir_ok=True)
        except (OSError, pa.ArrowException, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot use the output location {self.location}: {exc}") from None

    def committed_files(self) -> list[str]:
        selector = pyarrow.fs.FileSelector(self.root, allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector)
                      if info.type == pyarrow.fs.FileType.File and info.base_name.startswith("part-")
                      and info.base_name.endswith(".parquet"))

    def done_ids(self) -> set[str]:
        """Ids of every committed row (the id column only)."""
        ids: set[str] = set()
        for path in self.committed_files():
            with self.fs.open_input_file(path) as f:
                ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        return ids

    def commit(self, rows: pa.Table) -> str:
        """Write one part whole; return its name."""
        name = f"part-{uuid.uuid4().hex}.parquet"
        if self.local:
            temporary = self._path(f"{TMP_DIR}/{name}")
            self.fs.create_dir(self._path(TMP_DIR), recursive=True)
            with self.fs.open_output_stream(temporary) as f:
                pq.write_table(rows, f)
            self.fs.move(temporary, self._path(name))
        else:
            with self.fs.open_output_stream(self._path(name)) as f:
                pq.write_table(rows, f)
        return name

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_bytes(SUMMARY_FILE, json.dumps(summary, indent=1).encode())

    def read_all(self) -> pa.Table:
        tables = []
        for path in self.committed_files():
            with self.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()

    def _write_bytes(self, name: str, data: bytes) -> None:
        if self.local:
            temporary = self._path(f"{TMP_DIR}/{name}.{uuid.uuid4().hex}")
            self.fs.create_dir(self._path(TMP_DIR), recursive=True)
            with self.fs.open_output_stream(temporary) as f:
                f.write(data)
            self.fs.move(temporary, self._path(name))
        else:
            with self.fs.open_output_stream(self._path(name)) as f:
                f.write(data)
