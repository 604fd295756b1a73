"""How a run's outputs are committed, and found again: the data files are the truth.

Every write task writes its rows as one *task* of files named after it (`{write_uuid}_{task_index:06}`): its
auxiliary files first (the images of the 'files' format, the error rows of a WebDataset shard), then its main
file `data/{task}.{parquet,tar}` last. Each file is written whole or not at all (an S3 put is atomic; a local file
is written under a temporary name, then renamed), so a main file under its final name commits its task. Then the
task's index, `_index/{task}.parquet`: the resume key, key, error flag and weights hash of each row, and the sizes
of the task's files. The index is only a cache of what the data files hold, so that finding a run's rows reads
small files instead of every shard.

`reconcile` (before a run and again after it) rebuilds the truth from the files:
- a task whose files are all there, at the sizes its index records, holds its rows;
- a main file with no index (a crash between the two, or an index deleted by hand), or whose files changed since,
  is read and indexed again;
- a task with a file missing or unreadable, or whose rows are not whole (a prompt short of its images), is
  deleted whole, so its inputs are made again; so is an index without its main file;
- leftovers of unfinished tasks (temporary files, auxiliary files without a main file) are deleted.
Nothing else decides what exists: deleting the index, or Ray's or anyone's bookkeeping, loses and duplicates
nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from janus_batch.io.schemas import ERROR

DATA, IMAGES, INDEX = "data", "images", "_index"
TEMP_MARK = ".tmp-"
MAIN_EXTENSIONS = (".parquet", ".tar")
ERRORS_SUFFIX = ".errors.parquet"  # a WebDataset shard's error rows (a tar holds only samples)
INDEX_FILES_KEY = b"janus_batch.files"  # index schema metadata: {relative path: size} of the task's files
READ_THREADS = 32  # concurrent requests while reconciling (S3 latency, not bandwidth, bounds them)


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (pyarrow path: local absolute, or bucket/key)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        temp = f"{path}{TEMP_MARK}{uuid.uuid4().hex}"
        with fs.open_output_stream(temp) as f:
            f.write(data)
        fs.move(temp, path)  # a rename: atomic on one filesystem
    else:
        with fs.open_output_stream(path) as f:  # S3: the object appears on close, whole
            f.write(data)


def read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def index_schema(resume_type: pa.DataType, resume_key: str) -> pa.Schema:
    return pa.schema(
        [(resume_key, resume_type), ("key", pa.string()), ("failed", pa.bool_()), ("weights_hash", pa.string())]
    )


def index_rows(rows: pa.Table, resume_key: str, resume_type: pa.DataType) -> pa.Table:
    """The index columns of output rows (which have the resume key, key, error and weights_hash columns)."""
    return pa.table(
        {
            resume_key: rows[resume_key].cast(resume_type),
            "key": rows["key"].cast(pa.string()),
            "failed": pc.is_valid(rows[ERROR]),
            "weights_hash": rows["weights_hash"].cast(pa.string()),
        }
    )


@dataclass(frozen=True)
class RunFiles:
    """Where a run's files live and how its rows are keyed."""

    run_dir: str  # pyarrow path of OUTPUT/RUN_ID (local absolute, or bucket/key)
    filesystem: pafs.FileSystem
    resume_key: str  # 'row_hash' (Parquet inputs) or 'path' (image folders)
    resume_type: pa.DataType

    def path(self, relative: str) -> str:
        return posixpath.join(self.run_dir, relative)

    def commit_task(self, task: str, aux: dict[str, bytes], main: tuple[str, bytes], index: pa.Table) -> None:
        """Write a task's auxiliary files, then its main file (the commit), then its index (a cache)."""
        sizes = {}
        for relative, data in [*aux.items(), main]:
            write_file(self.filesystem, self.path(relative), data)
            sizes[relative] = len(data)
        meta = {INDEX_FILES_KEY: json.dumps(sizes).encode()}
        self.write_index(
            task, index.cast(index_schema(self.resume_type, self.resume_key)).replace_schema_metadata(meta)
        )

    def write_index(self, task: str, index: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(index, sink)
        write_file(self.filesystem, self.path(f"{INDEX}/{task}.parquet"), sink.getvalue().to_pybytes())

    def list(self, folder: str) -> dict[str, int]:
        """{path relative to the run: size} of every file under `folder` of the run."""
        selector = pafs.FileSelector(self.path(folder), recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        prefix = self.run_dir.rstrip("/") + "/"
        return {i.path.removeprefix(prefix): i.size for i in infos if i.type == pafs.FileType.File}

    def delete(self, relatives: list[str]) -> None:
        def delete_one(relative: str) -> None:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(self.path(relative))

        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(delete_one, relatives))  # raises the first failure: the run then stops


def task_of(relative: str) -> str | None:
    """The task a data or image file belongs to: its name up to the first '.' (data/) or its folder (images/)."""
    top, _, rest = relative.partition("/")
    if top == DATA:
        return rest.split(".", 1)[0] if "/" not in rest else None
    if top == IMAGES:
        return rest.split("/", 1)[0] if "/" in rest else None
    return None


def is_main(relative: str) -> bool:
    name = relative.removeprefix(f"{DATA}/")
    return (
        relative.startswith(f"{DATA}/")
        and "/" not in name
        and name.endswith(MAIN_EXTENSIONS)
        and not name.endswith(ERRORS_SUFFIX)
        and TEMP_MARK not in name
    )


@dataclass
class Reconciled:
    """What a run's data files hold, after reconciling them with the index."""

    done: pa.Array  # resume keys of the inputs whose output rows are all present
    rows: int  # output rows present
    errors: int  # of which error rows
    weights_hashes: set[str]  # of the models that made them
    requeued: int  # inputs whose rows were indexed but whose data were gone: made again
    deleted: list[str]  # files deleted (leftovers, incomplete tasks)

    def describe(self) -> str:
        parts = []
        if self.requeued:
            parts.append(f"{self.requeued} inputs whose data were missing are made again")
        if self.deleted:
            parts.append(f"{len(self.deleted)} unfinished or damaged files deleted")
        return "; ".join(parts)


# (the bytes of a task's files in data/ {relative: bytes}, the names of all its files) -> index rows; raises if
# they are unreadable or name files that are not there
TaskReader = Callable[[dict[str, bytes], set[str]], pa.Table]


def reconcile(run: RunFiles, read_task: TaskReader, rows_per_input: Callable[[bool], int]) -> Reconciled:
    """Make the index agree with the data files, delete what no committed task holds, and say what is there.
    `read_task` reads the index rows out of a task's main (and errors) file; `rows_per_input(failed)` is how many
    output rows an input makes (one error row, or its images)."""
    files = {**run.list(DATA), **run.list(IMAGES)}
    index_files = run.list(INDEX)
    deleted = [r for r in [*files, *index_files] if TEMP_MARK in r]
    files = {r: s for r, s in files.items() if TEMP_MARK not in r}
    indexes = {
        posixpath.basename(r).removesuffix(".parquet"): r
        for r in index_files
        if r.endswith(".parquet") and TEMP_MARK not in r
    }
    by_task: dict[str, dict[str, int]] = {}
    for relative, size in files.items():
        if (task := task_of(relative)) is not None:
            by_task.setdefault(task, {})[relative] = size
    mains = {task_of(r): r for r in files if is_main(r)}

    for task, task_files in by_task.items():
        if task not in mains:  # auxiliary files of a task that never committed
            deleted += list(task_files)

    def task_rows(task: str) -> pa.Table | None:
        table = cached_index(run, indexes.get(task), by_task[task])
        if table is None:
            table = reread_task(run, task, by_task[task], read_task)
        return table if table is not None and whole(table, run.resume_key, rows_per_input) else None

    def lost_inputs(index: str) -> int:
        try:
            return len(pq.read_table(run.path(index), columns=[run.resume_key], filesystem=run.filesystem)[0].unique())
        except (OSError, KeyError, pa.ArrowException):
            return 0

    committed = sorted(mains)
    orphan_indexes = [relative for task, relative in sorted(indexes.items()) if task not in mains]
    # A run has a file per model call: read their indexes side by side (one request each).
    with ThreadPoolExecutor(READ_THREADS) as pool:
        found = list(pool.map(task_rows, committed))
        requeued = sum(pool.map(lost_inputs, orphan_indexes))  # indexed inputs whose data are gone
    whole_tasks = {task: table for task, table in zip(committed, found, strict=True) if table is not None}
    redundant = redundant_tasks(whole_tasks, run.resume_key)
    tasks, tables = [], []
    for task, table in zip(committed, found, strict=True):
        if table is None or task in redundant:  # damaged (made again), or its inputs are all in other tasks
            deleted += [*by_task[task], *([indexes[task]] if task in indexes else [])]
        else:
            tasks.append(task)
            tables.append(table)
    deleted += orphan_indexes
    run.delete(deleted)

    schema = index_schema(run.resume_type, run.resume_key)
    table = (
        pa.concat_tables([t.replace_schema_metadata(None).cast(schema) for t in tables])
        if tables
        else schema.empty_table()
    )
    check_no_duplicates(table, run.resume_key, tables, tasks)
    return Reconciled(
        done=table[run.resume_key].combine_chunks().unique(),
        rows=table.num_rows,
        errors=pc.sum(table["failed"]).as_py() or 0,
        weights_hashes={h for h in table["weights_hash"].to_pylist() if h},
        requeued=requeued,
        deleted=deleted,
    )


def cached_index(run: RunFiles, index: str | None, task_files: dict[str, int]) -> pa.Table | None:
    """The task's index, if it names exactly the task's files at their present sizes."""
    if index is None:
        return None
    try:
        table = pq.read_table(run.path(index), filesystem=run.filesystem)
        recorded = json.loads(table.schema.metadata[INDEX_FILES_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None  # unreadable: read the data again
    return table if recorded == task_files else None


def reread_task(run: RunFiles, task: str, task_files: dict[str, int], read_task: TaskReader) -> pa.Table | None:
    """Index a committed task again from its data files; None if they cannot be read (the task is then redone)."""
    readable = {r: read_file(run.filesystem, run.path(r)) for r in task_files if r.startswith(f"{DATA}/")}
    try:
        table = read_task(readable, set(task_files))
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    table = table.replace_schema_metadata({INDEX_FILES_KEY: json.dumps(task_files).encode()})
    run.write_index(task, table)
    return table


def whole(table: pa.Table, resume_key: str, rows_per_input: Callable[[bool], int]) -> bool:
    """Every input in the task has all its output rows (a prompt its images, or one error row)."""
    counts = Counter(table[resume_key].to_pylist())
    failed = dict(zip(table[resume_key].to_pylist(), table["failed"].to_pylist(), strict=True))
    return all(count == rows_per_input(failed[key]) for key, count in counts.items())


def redundant_tasks(tables: dict[str, pa.Table], resume_key: str) -> set[str]:
    """Committed tasks every input of which is whole in another committed task too, so that deleting them loses
    nothing: a write task of an attempt that failed can still commit after the next attempt has made its inputs
    again (a PUT that pyarrow was still retrying when the job gave up: Ray cannot interrupt native code). Outputs
    are deterministic, so both copies are the same rows. Of two such tasks the later by name goes."""
    inputs = {task: set(table[resume_key].to_pylist()) for task, table in tables.items()}
    holders = Counter(key for keys in inputs.values() for key in keys)
    redundant = set()
    for task in sorted(inputs, reverse=True):
        if inputs[task] and all(holders[key] > 1 for key in inputs[task]):
            redundant.add(task)
            holders.subtract(inputs[task])
    return redundant


def check_no_duplicates(table: pa.Table, resume_key: str, tables: list[pa.Table], tasks: list[str]) -> None:
    """An input's rows in two committed tasks that redundant_tasks could not settle (tasks that overlap in part):
    never made by one driver, so say which files hold them."""
    counts = table.group_by(resume_key).aggregate([("key", "count_distinct"), ("key", "count")])
    twice = counts.filter(pc.not_equal(counts["key_count_distinct"], counts["key_count"]))
    if twice.num_rows == 0:
        return
    keys = set(twice[resume_key].to_pylist())
    holders = [t for t, tab in zip(tasks, tables, strict=True) if keys & set(tab[resume_key].to_pylist())]
    raise ValueError(
        f"{twice.num_rows} inputs have output rows in more than one data file ({', '.join(holders[:6])}): "
        "another driver wrote into this run, or files were copied in; remove the extra files or start a new run id"
    )


def parquet_task_reader(resume_key: str, resume_type: pa.DataType) -> TaskReader:
    """Index rows out of a Parquet main file (formats 'parquet' and 'files')."""

    def read(files: dict[str, bytes], names: set[str]) -> pa.Table:
        ((main, data),) = [(r, d) for r, d in files.items() if is_main(r)]
        table = pq.read_table(io.BytesIO(data))
        if "file_name" in table.column_names:  # 'files': the images it names must be there too
            missing = [f for f in table["file_name"].to_pylist() if f is not None and f not in names]
            if missing:
                raise FileNotFoundError(f"{main} names images that are gone: {missing[:3]}")
        return index_rows(table, resume_key, resume_type)

    return read
