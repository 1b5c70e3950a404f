"""The batch job's input rows, read once on the driver and checked whole before anything is written.

Each file is read row by row (JSON lines line by line, Parquet batch by batch, two columns), so
every refusal is one line naming the file, the line (JSON) or row (Parquet, counting from 1) and
the id: a line that is not UTF-8, not JSON or not an object; a line longer than MAX_LINE_BYTES
(no context holds that much text: it is refused unread, not tokenized); a prompt that is missing,
null, not a string, empty, or not text (a lone surrogate); an id that is missing, null, not a
string or integer, of another kind than the ids before it, or seen before (the job resumes by
id). Ids become strings (integers, and integral floats from Parquet, by their decimal digits).

A single JSON lines file whose rows have no id field gets its line numbers as ids ("1" for the
first line; blank lines count and are skipped): a rerun resumes correctly as long as the lines
keep their places (appending is fine). A folder or Parquet input without ids is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from endor_ray.errors import ConfigError

MAX_LINE_BYTES = 8 << 20  # 8 MiB: ~2 million tokens of text, past every context we serve
READ_CHUNK_BYTES = 1 << 20


@dataclass
class Rows:
    """Checked rows: ids and prompts in input order, and where each came from (for messages)."""

    ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # "FILE line N" / "FILE row N"
    ids_from_line_numbers: bool = False

    def table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.ids, pa.string()), "prompt": pa.array(self.prompts, pa.string())})


class RowChecker:
    """Row checks shared by both formats: one id kind, unique ids, prompts that are text."""

    def __init__(self, prompt_column: str, id_column: str):
        self.prompt_column, self.id_column = prompt_column, id_column
        self.rows = Rows()
        self.first_place: dict[str, str] = {}
        self.id_kind: str | None = None

    def add(self, place: str, prompt_id: Any, prompt: Any) -> None:
        text_id = self._id(place, prompt_id)
        if prompt is None:
            raise ConfigError(f"the input {place} (id {text_id!r}): the prompt is null; every row needs a prompt string")
        if not isinstance(prompt, str):
            raise ConfigError(f"the input {place} (id {text_id!r}): the prompt is a {type(prompt).__name__}, not a "
                              "string; prompts must be strings")
        if not prompt:
            raise ConfigError(f"the input {place}: the prompt of id {text_id!r} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"the input {place} (id {text_id!r}): the prompt is not text (a lone surrogate "
                              f"{prompt[exc.start]!r} at character {exc.start})") from None
        if text_id in self.first_place:
            raise ConfigError(f"the input {place}: id {text_id!r} appears twice (first at {self.first_place[text_id]}; "
                              "ids must be unique)")
        self.first_place[text_id] = place
        self.rows.ids.append(text_id)
        self.rows.prompts.append(prompt)
        self.rows.places.append(place)

    def _id(self, place: str, prompt_id: Any) -> str:
        if prompt_id is None:
            raise ConfigError(f"the input {place} is a row without an id (the job resumes by id: every row needs one)")
        if isinstance(prompt_id, float) and prompt_id.is_integer():
            prompt_id = int(prompt_id)  # Parquet written from pandas: integer ids as floats
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
            raise ConfigError(f"the input {place}: id {prompt_id!r} is a {type(prompt_id).__name__}; ids must be "
                              "strings or integers")
        kind = "string" if isinstance(prompt_id, str) else "integer"
        if self.id_kind is None:
            self.id_kind = kind
        elif kind != self.id_kind:
            raise ConfigError(f"cannot read the input {place}: id {prompt_id!r} is a {kind} but the ids before it are "
                              f"{self.id_kind}s; give every id the same kind")
        return prompt_id if kind == "string" else str(prompt_id)


def _lines(stream, name: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line bytes) of a binary stream, refusing a line over MAX_LINE_BYTES
    before it is buffered whole."""
    pending, number = b"", 0
    while True:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise ConfigError(f"the input {name} line {number} has {len(line)} bytes, more than the "
                                  f"{MAX_LINE_BYTES} a line may have (no context holds that much text)")
            yield number, line
        if len(pending) > MAX_LINE_BYTES:
            raise ConfigError(f"the input {name} line {number + 1} has more than the {MAX_LINE_BYTES} bytes a line "
                              "may have (no context holds that much text)")
    if pending:
        yield number + 1, pending


def read_jsonl(checker: RowChecker, stream, name: str, single_file: bool) -> None:
    """Check and add the rows of one JSON lines stream (`name` in messages)."""
    missing_id = missing_prompt = None  # the first line without the field (judged at the end: a column
    seen_id = seen_prompt = False       # no row has is worded as such)
    derived: list[tuple[int, Any]] = []  # (line, prompt) of rows while no id was seen
    for number, raw in _lines(stream, name):
        place = f"{name} line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the input {place} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                              f"{exc.start + 1})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer of 5000 digits
            raise ConfigError(f"cannot read the input {place}: {str(exc).splitlines()[0][:200]}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"cannot read the input {place}: a JSON object is expected, got {type(row).__name__}")
        seen_prompt |= checker.prompt_column in row
        if checker.prompt_column not in row:
            missing_prompt = missing_prompt or place
            continue
        if checker.id_column not in row:
            missing_id = missing_id or place
            derived.append((number, row[checker.prompt_column]))
            continue
        seen_id = True
        if missing_id:
            break
        checker.add(place, row[checker.id_column], row[checker.prompt_column])
    if not seen_prompt and missing_prompt:
        raise ConfigError(f"the input {name} has no {checker.prompt_column!r} column; name it with --prompt-column")
    if missing_prompt:
        raise ConfigError(f"the input {missing_prompt} has no {checker.prompt_column!r} field; every row needs a "
                          "prompt string")
    if seen_id and missing_id:
        raise ConfigError(f"the input {missing_id} is a row without an id (the job resumes by id: every row needs one)")
    if derived:
        if not single_file:
            raise ConfigError(f"the input {name} has no {checker.id_column!r} column; name it with --id-column (the "
                              "job resumes by id: every row needs one; only a single JSON lines file may use its "
                              "line numbers)")
        checker.rows.ids_from_line_numbers = True
        for number, prompt in derived:
            checker.add(f"{name} line {number}", str(number), prompt)


def read_parquet(checker: RowChecker, source, name: str) -> None:
    """Check and add the rows of one Parquet file (`source`: a file object)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
        columns = parquet.schema_arrow.names
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read the input {name}: {str(exc).splitlines()[0][:200]}") from None
    for column, option in ((checker.prompt_column, "--prompt-column"), (checker.id_column, "--id-column")):
        if column not in columns:
            raise ConfigError(f"the input {name} has no {column!r} column (its columns: {', '.join(columns)}); "
                              f"name it with {option}" + (" (the job resumes by id: every row needs one)"
                                                          if column == checker.id_column else ""))
    prompt_type = parquet.schema_arrow.field(checker.prompt_column).type
    if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
        raise ConfigError(f"the input {name}: prompts must be strings, got {prompt_type}")
    row_number = 0
    try:
        for batch in parquet.iter_batches(columns=[checker.id_column, checker.prompt_column], batch_size=65536):
            ids = batch.column(checker.id_column).to_pylist()
            prompts = _strings(batch.column(checker.prompt_column), name, row_number)
            for prompt_id, prompt in zip(ids, prompts):
                row_number += 1
                checker.add(f"{name} row {row_number}", prompt_id, prompt)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read the input {name}: {str(exc).splitlines()[0][:200]}") from None


def _strings(column: pa.Array, name: str, first_row: int) -> list[str | None]:
    """A string column as Python strings; ConfigError naming the row that is not UTF-8."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        for offset in range(len(column)):
            try:
                column[offset].as_py()
            except UnicodeDecodeError:
                raise ConfigError(f"the input {name} row {first_row + offset + 1}: the prompt is not UTF-8 "
                                  "text") from None
        raise
