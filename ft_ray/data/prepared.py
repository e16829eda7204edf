"""Tokenized and packed data kept in storage (`ft-ray prepare`), so repeated runs and
sweeps over the same corpus skip parsing and tokenization.

A prepared folder holds `train/` and `eval/` Parquet files (and `eval.<name>/` for each of
`data.eval_sets`), `rejected/`, and `stats.json`
written last: a folder without `stats.json` is incomplete and never read. Its default
place is `<storage.path>/prepared/<fingerprint>`, where the fingerprint covers everything
that changes the packed sequences (sources and their files' sizes and times, format,
split, packing, seed, tokenizer, sequence length).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import pyarrow.fs as pafs

from ft_ray.config import JobConfig, SourceConfig
from ft_ray.console import LOG
from ft_ray.data.pipeline import EVAL_SET, DataStats, build_datasets
from ft_ray.data.readers import fs_path
from ft_ray.data.sources import list_files
from ft_ray.storage import filesystem_for

STATS_FILE = "stats.json"
PREPARED_VERSION = 4  # 2: sample ids name files relative to their source's folder (records.source_name); 3: long texts in windows;
# 4: a chat template's opening bos left out (formats._render), SentencePiece's word mark only at an
# example's start (tokenize.encode_batch)


def data_files(config: JobConfig) -> list[dict[str, Any]]:
    """Each source of the job (train, eval, then the eval sets) with its files' (path, size,
    modification time): what the fingerprint covers of the data, and what a resumed run compares."""
    files = []
    for key, source in data_sources(config):
        fs, paths = list_files(source, config.storage, key)
        infos = fs.get_file_info([fs_path(p) for p in paths])  # a hub dataset's paths carry its commit
        files.append({"source": source.model_dump(), "files": [(i.path, i.size, str(i.mtime)) for i in infos]})
    return files


def data_sources(config: JobConfig) -> list[tuple[str, SourceConfig]]:
    """(key, source) of each source of the job: train, eval, then the eval sets."""
    data = config.data
    sources = ([("data.train", s) for s in data.all_sources()] + [("data.eval", data.eval_source())]
               + [(key, source) for _, key, source in data.eval_set_sources()])
    return [(key, source) for key, source in sources if source is not None]


def fingerprint(config: JobConfig, files: list[dict[str, Any]] | None = None, listed: bool = True) -> str:
    """A short hash of what the packed sequences depend on (`files`: `data_files(config)`;
    without `listed`, the files of an adapter or teacher folder are left out: no request)."""
    data = config.data
    what = {"version": PREPARED_VERSION, "files": data_files(config) if files is None else files,
            "data": data.model_dump(exclude={"prepared", "max_rejected_fraction", "train", "sources", "eval",
                                             "eval_sets"}),
            "seed": config.shuffle_seed,
            "roles": config.carries_roles,  # preference data carries each token's role
            "reference": reference_settings(config, listed),
            **({"teacher": teacher_settings(config, listed)} if config.precomputes_teacher else {}),
            "model": config.model.model_dump(include={"name_or_path", "revision", "max_seq_len", "add_tokens",
                                                      "chat_template"}),
            # the sets' names name their splits (their files are in `files`)
            **({"eval_sets": sorted(data.eval_sets)} if data.eval_sets else {})}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_settings(config: JobConfig, listed: bool = True) -> dict[str, Any] | None:
    """What precomputed reference log-probs depend on beyond the base model: how it is loaded."""
    if not config.precomputes_reference:
        return None
    adapter = folder_files(config.model.adapter, config) if config.model.adapter and listed else None  # base with it
    return {**loading_settings(config), "untrained_tokens": config.model.untrained_tokens,
            **({"adapter": adapter} if adapter else {})}


def teacher_settings(config: JobConfig, listed: bool = True) -> dict[str, Any]:
    """What precomputed teacher logits depend on beyond the packed rows: the teacher (its
    files as they are now, where it is a folder), how it is loaded, how many are kept."""
    teacher = config.distill.teacher or ""
    local = "://" not in teacher and pafs.LocalFileSystem().get_file_info(teacher).type == pafs.FileType.Directory
    files = folder_files(teacher, config) if listed and (local or teacher.startswith("s3://")) else None
    uld = {"divergence": "uld", "aligned": "by text"} if config.distill.divergence == "uld" else {}  # its own tokens
    return {**loading_settings(config), "teacher": teacher, "files": files, "top_k": config.distill.top_k, **uld}


def loading_settings(config: JobConfig) -> dict[str, Any]:
    """How a frozen model is loaded for a precomputed column: the method's precision."""
    return {"method": config.method, "precision": config.train.precision,
            "quantization": config.quantization.model_dump() if config.method == "qlora" else None}


def folder_files(path: str, config: JobConfig) -> list[tuple[str, int, int]]:
    """The files at the top of a local or s3:// folder: (name, size, mtime_ns)."""
    fs, folder = filesystem_for(path, config.storage)
    files = sorted((f for f in fs.get_file_info(pafs.FileSelector(folder)) if f.type == pafs.FileType.File),
                   key=lambda f: f.base_name)
    return [(f.base_name, f.size, f.mtime_ns) for f in files]


def location(config: JobConfig, files: list[dict[str, Any]] | None = None) -> str:
    """Where the job's prepared data lives (or would)."""
    return config.data.prepared or f"{config.storage.path.rstrip('/')}/prepared/{fingerprint(config, files)}"


def read_stats(where: str, config: JobConfig) -> dict[str, Any] | None:
    """The `stats.json` of a prepared folder, or None when the folder is incomplete: no
    stats.json yet, or one cut short by a kill while it was written (prepared again)."""
    fs, root = filesystem_for(where, config.storage)
    try:
        with fs.open_input_stream(f"{root}/{STATS_FILE}") as f:
            saved = json.loads(f.read())
        DataStats(**saved["stats"])
        return saved
    except (FileNotFoundError, OSError):
        return None
    except (ValueError, KeyError, TypeError) as e:
        LOG.warning(f"{where}/{STATS_FILE} is unreadable ({type(e).__name__}: {e}); "
                    "preparing the data again")
        return None


def prepared_stats(config: JobConfig) -> DataStats | None:
    """The stats of the job's complete prepared folder, or None (without reading the data)."""
    saved = read_stats(location(config), config)
    return DataStats(**saved["stats"]) if saved else None


def load_prepared(config: JobConfig, where: str | None = None) -> tuple[dict[str, Any], DataStats, str] | None:
    """The prepared datasets and their stats (at `where`, default `location(config)`), or None
    when there are none (complete) yet."""
    import ray.data

    where = where or location(config)
    saved = read_stats(where, config)
    if saved is None:
        return None
    fs, root = filesystem_for(where, config.storage)
    if saved.get("fingerprint") != fingerprint(config):
        LOG.warning(f"{where} was prepared from other data or settings than this job's; "
                    "using it because data.prepared names it")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # Ray's default Parquet reader (datasource V2) starts a pool of footer-reading actors for
    # every read (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, 32): about 2 s a split on an idle 2-core
    # machine and 4-8 s beside a training run, where V1 reads a prepared split in 0.1 s
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    splits = ["train", "eval", *[EVAL_SET.format(name) for name in saved["stats"].get("eval_sets", {})]]
    try:
        datasets = {split: ray.data.read_parquet(f"{root}/{split}", filesystem=fs).materialize() for split in splits}
    finally:
        context.use_datasource_v2 = v2
    return datasets, DataStats(**saved["stats"]), where


def prepare(config: JobConfig, tokenizer: Any, where: str | None = None) -> tuple[dict[str, Any], DataStats, str]:
    """Tokenize and pack the job's data into its prepared folder (`where`, default
    `location(config)`; stats.json last)."""
    from ray.data import SaveMode

    where = where or location(config)
    fs, root = filesystem_for(where, config.storage)
    datasets, stats = build_datasets(config, tokenizer, f"{root}/rejected", fs)
    if config.precomputes:
        from ft_ray.train.objectives import with_precomputed

        datasets = with_precomputed(config, datasets)
    for split, dataset in datasets.items():
        # overwrite: an earlier prepare killed before stats.json may have left files here
        dataset.write_parquet(f"{root}/{split}", filesystem=fs, mode=SaveMode.OVERWRITE)
    with fs.open_output_stream(f"{root}/{STATS_FILE}") as f:
        f.write(json.dumps({"fingerprint": fingerprint(config), "stats": asdict(stats)}, indent=2).encode())
    return datasets, stats, where


def datasets_for(config: JobConfig, tokenizer: Any, rejected_dir: str, rejected_fs: Any, where: str | None = None
                 ) -> tuple[dict[str, Any], DataStats]:
    """Prepared data when the job has some (at `where`, default `location(config)`), else the
    corpus tokenized now."""
    found = load_prepared(config, where)
    if found:
        LOG.info(f"data: using prepared data at {found[2]}")
        return found[0], found[1]
    return build_datasets(config, tokenizer, rejected_dir, rejected_fs)
