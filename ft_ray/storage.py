"""The one place that turns `storage.path` into a filesystem and reads or writes run files.

Local folders and `s3://bucket/prefix` (with an endpoint for S3-compatible stores) go
through pyarrow's filesystems, the same ones Ray Train uses for checkpoints. Credentials
come from the environment (AWS_*), never from the job file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from ft_ray.config import JobConfig, StorageConfig
from ft_ray.console import LOG


def filesystem(storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `storage.path` and the path inside it."""
    return filesystem_for(storage.path, storage)


def filesystem_for(path: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem of any local path or s3:// URI (data sources, prepared data) and the
    path inside it; S3 uses the endpoint and region of the storage section."""
    if path.startswith("s3://"):
        endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")  # the standard AWS variable
        # Transient errors (a store restarting, throttling, a dropped connection) are retried with
        # backoff inside every request, Ray Train's checkpoint uploads included.
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=storage.region or "us-east-1",
                               scheme="http" if (endpoint or "").startswith("http://") else "https",
                               connect_timeout=10, request_timeout=60,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts))
        return fs, path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).absolute())


@contextlib.contextmanager
def local_folder(path: str, storage: StorageConfig, prefix: str = "ft-ray-") -> Iterator[Path]:
    """A folder of weights (a variant, an adapter) as a local folder while the block runs: a
    local path as it is; an s3:// URI downloaded to a temporary folder, removed after (models
    read their files while they load; a full 8B model is 16 GB of a node's disk per actor)."""
    if "://" not in path:
        yield Path(path)
        return
    fs, inside = filesystem_for(path, storage)
    with tempfile.TemporaryDirectory(prefix=prefix) as local:
        pafs.copy_files(inside, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(local)


MODEL_COPY = "model_copy"  # the progress board's record of a worker's copy of the model
# weight formats: a model's own (its safetensors, else its .bin files) come only to a process
# that loads its weights; the rest never (Llama 3's original/consolidated.pth, GGUF copies)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def cached_folder(uri: str, storage: StorageConfig) -> Path:
    """Where `cached_model` keeps the copy of the model at `uri` on this node (read with
    `storage`'s endpoint): a folder of `storage.model_cache` named after the model and a digest
    of the endpoint and URI. Makes no request."""
    import hashlib

    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
    digest = hashlib.sha256(f"{endpoint}|{uri}".encode()).hexdigest()[:12]
    return Path(storage.model_cache).expanduser() / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"


COPY_CHUNK = 16 * 2**20  # bytes read from the store at a time while copying a model
COPY_REPORT_S = 2.0  # how often a copy's progress goes to the driver's board


def cached_model(uri: str, storage: StorageConfig, weights: bool, board: Any = None) -> Path:
    """A model folder in object storage (`s3://bucket/models/llama`) as a folder on this node.

    The files at the top of the folder are copied once into the node's model cache
    (`storage.model_cache`) and kept for later processes and runs: without `weights` what a
    tokenizer and a config read (no weight files), with them also the model's safetensors
    (else its .bin files). A file whose size or time changed in the store is copied again.
    The processes of a node (workers, data tasks) wait for the one copying (a file lock), and
    for one removing the model to make room for another (`make_room`; then it is copied again);
    a copy cut short is never taken for a whole file (each is written aside, then renamed).
    `board` (the driver's progress board) gets the copy's bytes as it goes (`model_copy`).

    Raises:
        FileNotFoundError: no files there.
        StorageError: the store failed, or a file came short.
    """
    import fcntl

    fs, inside = filesystem_for(uri, storage)
    listing = _stored_files(fs, inside, uri)
    names = _files_read(listing, weights)
    copy = _ModelCopy(uri, fs, inside, cached_folder(uri, storage), listing)
    copy.folder.parent.mkdir(parents=True, exist_ok=True)
    with open(copy.folder.parent / f"{copy.folder.name}.lock", "a") as lock:  # released on close or death
        # shared with other readers, never held beside a copy or a removal (`make_room`): a model
        # found whole here had its use noted before any removal could check it, and a removal
        # under way is waited for (the model is then copied again)
        fcntl.flock(lock, fcntl.LOCK_SH)
        with contextlib.suppress(FileNotFoundError):
            os.utime(copy.record)
        if all(copy.held().get(name) == listing[name] for name in names):
            return copy.folder
        fcntl.flock(lock, fcntl.LOCK_EX)  # to copy: the shared lock let go first, so another may copy before
        copy.run([name for name in names if name not in copy.current()], board, storage.model_cache_max_gib)
    return copy.folder


def model_copy_bytes(uri: str, storage: StorageConfig) -> int:
    """The bytes `cached_model` copies to each node that loads the model at `uri` (its
    weights and the files beside them), from the store's listing.

    Raises:
        FileNotFoundError: no files there.
        StorageError: the store failed."""
    fs, inside = filesystem_for(uri, storage)
    listing = _stored_files(fs, inside, uri)
    return sum(listing[name][0] for name in _files_read(listing, weights=True))


def _stored_files(fs: pafs.FileSystem, inside: str, uri: str) -> dict[str, list]:
    """The files at the top of the folder: name -> [size, mtime_ns]."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(inside, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {e}") from e
    listing = {info.base_name: [info.size, info.mtime_ns] for info in infos if info.type == pafs.FileType.File}
    if not listing:
        raise FileNotFoundError(f"no files in {uri}")
    return listing


def _files_read(listing: dict[str, list], weights: bool) -> list[str]:
    """What a tokenizer and a config read (no weight files), with `weights` also the model's
    safetensors, else its .bin files."""
    names = [name for name in listing if not name.endswith(WEIGHT_SUFFIXES)]
    if weights:
        tensors = [name for name in listing if name.endswith(".safetensors")]
        names += tensors or [name for name in listing if name.endswith(".bin")]
    return names


def size_text(count: int) -> str:
    """Bytes as people read them: MiB below a GiB, else GiB."""
    return f"{count / 2**30:,.1f} GiB" if count >= 2**30 else f"{count / 2**20:,.1f} MiB"


CACHE_KEEP_S = 3600  # a cached model used this recently is never removed to make room: a run may be loading it


def make_room(folder: Path, size: int, max_bytes: int | None) -> list[Path]:
    """Remove the models of `folder`'s cache used longest ago (by their records' times,
    `cached_model` notes each use) until `size` more bytes fit the disk and, with `max_bytes`,
    the cache; never `folder`, a model used in the last CACHE_KEEP_S (checked again under its
    lock) or one another process holds the lock of (copying it, or finding it whole in
    `cached_model`). Returns the folders removed."""
    import fcntl

    cache = folder.parent
    entries = []  # (last use, folder, bytes) of every other cached model
    for record in cache.glob("*.json"):
        model = cache / record.name[:-len(".json")]
        with contextlib.suppress(FileNotFoundError):  # (removed by another process meanwhile)
            if model != folder and model.is_dir():
                entries.append((record.stat().st_mtime, model, _bytes_under(model)))
    held = sum(used for _, _, used in entries) + _bytes_under(folder)

    def fits() -> bool:
        return (shutil.disk_usage(cache).free >= size) and (max_bytes is None or held + size <= max_bytes)

    removed = []
    for last_use, model, used in sorted(entries, key=lambda entry: entry[0]):
        if fits() or time.time() - last_use < CACHE_KEEP_S:
            break
        record = cache / f"{model.name}.json"
        with open(cache / f"{model.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if time.time() - record.stat().st_mtime < CACHE_KEEP_S:
                    continue  # used again since it was listed
            except BlockingIOError:
                continue  # being copied, or found whole by a process about to load it
            except FileNotFoundError:
                held -= used  # removed by another process
                continue
            shutil.rmtree(model, ignore_errors=True)
            record.unlink()
        held -= used
        removed.append(model)
        LOG.info(f"model cache: removed {model.name} ({size_text(used)}, last used "
                 f"{(time.time() - last_use) / 3600:.1f} h ago) to make room on this node")
    return removed


def _bytes_under(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


class _ModelCopy:
    """The copy of a model folder in the store (`listing`: name -> [size, mtime_ns]) in
    `folder`, with a record of the files copied whole beside it (`<folder>.json`)."""

    def __init__(self, uri: str, fs: pafs.FileSystem, inside: str, folder: Path, listing: dict[str, list]):
        self.uri, self.fs, self.inside, self.folder, self.listing = uri, fs, inside, folder, listing
        self.record = folder.parent / f"{folder.name}.json"

    def held(self) -> dict[str, list]:
        """The files copied whole, as the store listed them when they were copied."""
        held = json.loads(self.record.read_text()) if self.record.is_file() else {}
        return {name: entry for name, entry in held.items() if (self.folder / name).is_file()}

    def current(self) -> dict[str, list]:
        """`held`, less the files changed or gone in the store since (deleted; under the lock)."""
        held = self.held()
        for name in [name for name, entry in held.items() if self.listing.get(name) != entry]:
            (self.folder / name).unlink()
            del held[name]
        self._write(held)
        return held

    def run(self, missing: list[str], board: Any, max_gib: float | None = None) -> None:
        """Copy the `missing` files (4 at a time), each recorded once whole, after making room
        for them (`make_room`); the bytes go to `board` as they come."""
        import threading
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if not missing:
            return
        size = sum(self.listing[name][0] for name in missing)
        self.folder.mkdir(parents=True, exist_ok=True)
        make_room(self.folder, size, None if max_gib is None else int(max_gib * 2**30))
        free = shutil.disk_usage(self.folder).free
        if free < size:
            raise StorageError(f"{self.uri} needs {size_text(size)} more in storage.model_cache "
                               f"({self.folder.parent}), which has {size_text(free)} free on this node (less any "
                               f"model used in the last {CACHE_KEEP_S // 60} minutes): set storage.model_cache to "
                               "a folder on a larger disk")
        LOG.info(f"model: copying {len(missing)} file(s) ({size_text(size)}) of {self.uri} to {self.folder} "
                 "(this node's model cache, once)")
        start, done, reported, counting = time.monotonic(), [0], [0.0], threading.Lock()

        def report(final: bool = False) -> None:
            if board is not None and (final or time.monotonic() - reported[0] >= COPY_REPORT_S):
                reported[0] = time.monotonic()
                board.put.remote(MODEL_COPY, {"uri": self.uri, "bytes": size, "copied": done[0],
                                              "seconds": reported[0] - start})

        def progress(n: int) -> None:
            with counting:
                done[0] += n
                report()

        held = self.held()
        with ThreadPoolExecutor(4) as pool:
            for future in as_completed([pool.submit(self._copy_file, name, progress) for name in missing]):
                held[future.result()] = self.listing[future.result()]
                self._write(held)
        report(final=True)
        LOG.info(f"model: {self.uri} copied in {time.monotonic() - start:.1f} s")

    def _copy_file(self, name: str, progress: Any) -> str:
        aside = self.folder / f".{name}.part"
        try:
            with self.fs.open_input_stream(f"{self.inside}/{name}") as source, open(aside, "wb") as target:
                while chunk := source.read(COPY_CHUNK):
                    target.write(chunk)
                    progress(len(chunk))
        except OSError as e:  # the store's, or this disk's (full)
            raise StorageError(f"cannot copy {self.uri}/{name} to {aside}: {e}") from e
        if aside.stat().st_size != self.listing[name][0]:
            raise StorageError(f"{self.uri}/{name}: {aside.stat().st_size} bytes came of {self.listing[name][0]}")
        aside.rename(self.folder / name)
        return name

    def _write(self, held: dict[str, list]) -> None:
        part = self.record.with_name(f".{self.record.name}.part")
        part.write_text(json.dumps(held))
        part.rename(self.record)


# `validate` and `plan` read a job's data to answer a question before launch: each object-store
# request is tried at most this often, so an unreachable store is said in seconds (measured with
# pyarrow 26: 3 tries of a refused connection 1.4 s; the 10 of `storage.max_attempts` 74-93 s).
PREFLIGHT_ATTEMPTS = 3


def for_preflight(config: JobConfig) -> JobConfig:
    """The job with each object-store request tried at most PREFLIGHT_ATTEMPTS times."""
    storage = config.storage.model_copy(update={"max_attempts": min(config.storage.max_attempts, PREFLIGHT_ATTEMPTS)})
    model = config.model.model_copy()
    model.use_storage(storage)
    return config.model_copy(update={"storage": storage, "model": model})


class StorageError(OSError):
    """The store failed a request after its retries; the message names the URI."""


@dataclass
class RunFolder:
    """`<storage.path>/<run_name>/`: checkpoints (written by Ray Train), config, metrics, summary."""

    fs: pafs.FileSystem
    root: str
    uri: str
    storage: StorageConfig | None = None  # an object store's endpoint and region (leases reach it through boto3)

    @classmethod
    def for_job(cls, config: JobConfig, name: str | None = None) -> "RunFolder":
        """`<storage.path>/<name or run_name>`."""
        fs, base = filesystem(config.storage)
        scheme = "s3://" if config.storage.path.startswith("s3://") else ""
        root = f"{base}/{name or config.run_name}"
        return cls(fs=fs, root=root, uri=f"{scheme}{root}", storage=config.storage)

    @classmethod
    def at(cls, path: str, storage: StorageConfig) -> "RunFolder":
        """The folder at a local path or s3:// URI (S3 settings from `storage`)."""
        fs, root = filesystem_for(path, storage)
        return cls(fs=fs, root=root, uri=path.rstrip("/") if "://" in path else root, storage=storage)

    def child(self, *parts: str) -> "RunFolder":
        """A folder inside this one, on the same filesystem."""
        return RunFolder(fs=self.fs, root=self.path(*parts), uri=self.uri_of(*parts), storage=self.storage)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local_path(self, *parts: str) -> Path:
        """A local path inside the run folder (only for local storage)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.path(*parts))

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def write_text(self, name: str, text: str) -> None:
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(text.encode("utf-8"))
        except OSError as e:
            raise StorageError(f"cannot write {self.uri_of(name)}: {e}") from e

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            if "NoSuchKey" in str(e) or "not found" in str(e).lower():
                return None
            raise StorageError(f"cannot read {self.uri_of(name)}: {e}") from e

    def upload(self, local_folder: Path, name: str) -> str:
        """Copy a local folder into the run folder; returns its URI."""
        if self.is_local and Path(self.path(name)) == Path(local_folder).resolve():
            return self.uri_of(name)
        try:
            pafs.copy_files(str(local_folder), self.path(name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except OSError as e:
            raise StorageError(f"cannot upload {local_folder} to {self.uri_of(name)}: {e}") from e
        return self.uri_of(name)

    def move_aside(self, leave: tuple[str, ...] = ()) -> str:
        """Rename the run folder to `<run>.replaced-<UTC time>` (a copy and a delete on object
        stores), so a new run of the same name starts empty and nothing old is lost; on object
        stores the copies of the files named in `leave` are removed (this driver's lease)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self.root}.replaced-{stamp}"
        if self.is_local:
            os.rename(self.root, target)
        else:
            pafs.copy_files(self.root, target, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.root)
            for name in leave:
                if self.fs.get_file_info(f"{target}/{name}").type == pafs.FileType.File:
                    self.fs.delete_file(f"{target}/{name}")
        return self.uri[: len(self.uri) - len(self.root)] + target


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, written by rank 0 only.

    Lines are kept in memory and the whole file is rewritten on `flush`, which works the
    same on object stores that cannot append. On resume, lines past the restored step
    are dropped, so a step never appears twice.
    """

    def __init__(self, run: RunFolder, resume_step: int | None, enabled: bool, name: str = "metrics.jsonl"):
        self.run, self.enabled, self.name = run, enabled, name
        self.lines: list[str] = []
        if enabled and resume_step is not None:
            records = parse_jsonl(run.read_text(name) or "", run.uri_of(name))
            self.lines = [json.dumps(record) for record in records if record.get("step", 0) <= resume_step]
        if enabled:
            self.flush()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        self.lines.append(line)
        if self.run.is_local:  # appending keeps a long run's log cheap; object stores get it on flush
            with open(self.run.local_path(self.name), "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def flush(self) -> None:
        if self.enabled:
            self.run.write_text(self.name, "".join(line + "\n" for line in self.lines))


def read_metrics(run: RunFolder) -> list[dict]:
    return parse_jsonl(run.read_text("metrics.jsonl") or "", run.uri_of("metrics.jsonl"))


def parse_jsonl(text: str, where: str) -> list[dict]:
    """The JSON objects of a log ft-ray wrote itself, one per line. A line that does not parse
    (cut short when a process was killed while writing it) is dropped with a warning: the
    steps it held are trained again on resume."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            LOG.warning(f"{where}:{number}: dropped a partial line ({len(line)} characters), "
                        "left by a process killed while writing it")
    return records

