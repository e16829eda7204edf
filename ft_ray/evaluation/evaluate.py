"""`ft-ray eval`: does fine-tuning pay? The variant against the base model and against
prompting it (the first training examples before each prompt, or the most similar ones:
retrieval), on the same held-out examples, with a verdict and the cost per request.

The held-out records stream through Ray Data into `ArmScorer` actors (one model copy each,
a GPU each when the job uses GPUs); the driver only keeps one row of figures per example
(losses, token counts, scores), which the paired bootstrap needs.

    <run or winner folder>/eval.json   every figure, the verdict, a few answers side by side
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.fs as pafs

from ft_ray import progress
from ft_ray.config import InputError, JobConfig, SourceConfig, check_folder_name
from ft_ray.console import LOG, quiet
from ft_ray.data.formats import RecordError
from ft_ray.data.records import eval_bucket, example_key, readable, record_to_segments
from ft_ray.data.readers import ReadLimits
from ft_ray.data.sources import choose_format, eval_examples, list_files, read_corpus, read_records
from ft_ray.evaluation import metrics
from ft_ray.evaluation.arms import ALL_ARMS, PROMPTING, arms_of
from ft_ray.evaluation.pairs import PairScorer, summarize_pairs
from ft_ray.evaluation.scoring import ArmScorer, record_key, shot_text
from ft_ray.storage import RunFolder
from ft_ray.train.checkpoints import stored_files_problem

FEW_DATA = 100  # fewer training examples than this rarely make fine-tuning worth it
SAMPLES_KEPT = 5  # answers shown side by side in eval.json


@dataclass
class Target:
    """What is evaluated (weights: a local folder or a URI) and where eval.json goes."""

    weights: str
    folder: RunFolder
    train_examples: int | None
    origin: str | None = None  # what eval.json names as the variant when `weights` is a temporary export


# ---------------------------------------------------------------- what to evaluate


@contextlib.contextmanager
def resolve_target(path: str, config: JobConfig) -> Iterator[Target]:
    """What `path` holds to evaluate, while the evaluation runs: a run folder (its exported
    adapter or model), a sweep winner folder, a local checkpoint folder (exported into a
    hidden folder of its run, where every node of a cluster reads it, removed on leaving) or
    an adapter / model folder.

    Raises:
        InputError: none of those is at `path`.
    """
    folder = RunFolder.at(path, config.storage)
    summary = _json(folder, "summary.json")
    if summary:
        check_trained_on(config, folder)
        weights = summary.get("adapter_path") or summary.get("model_path")
        if not weights:
            raise InputError(f"{folder.uri}: the run exported no weights (summary.json has no adapter_path/model_path)")
        yield Target(weights, folder, summary.get("data", {}).get("train_examples"))
        return
    winner = _json(folder, "winner.json")
    if winner:
        problem = stored_files_problem(folder.fs, folder.root, winner.get("files") or {}) if winner.get("files") \
            else "winner.json lists no files"
        if problem:
            raise InputError(f"{folder.uri}: {problem}; not evaluated (the winner's files are incomplete or changed)")
        trial = RunFolder.at(winner["source_checkpoint"].rsplit("/", 1)[0], config.storage)
        check_trained_on(config, trial)
        trial_summary = _json(trial, "summary.json") or {}
        yield Target(folder.uri_of("weights"), folder, trial_summary.get("data", {}).get("train_examples"))
    elif Path(folder.root).name.startswith("checkpoint-"):
        with _exported_checkpoint(folder, config) as target:
            yield target
    elif folder.read_text("adapter_config.json") is not None or folder.read_text("config.json") is not None:
        yield Target(folder.uri, folder, None)
    elif folder.fs.get_file_info(folder.root).type == pafs.FileType.NotFound:
        raise InputError(f"{folder.uri}: nothing there (a run folder, sweep winner, checkpoint or adapter / model "
                         "folder)")
    else:
        raise InputError(f"{folder.uri}: not a run folder (summary.json), a sweep winner (winner.json), a checkpoint "
                         "or an adapter / model folder")


@contextlib.contextmanager
def _exported_checkpoint(checkpoint: RunFolder, config: JobConfig) -> Iterator[Target]:
    from ft_ray.export import export_checkpoint

    if not checkpoint.is_local:
        raise InputError(f"{checkpoint.uri}: evaluate the run folder (or `ft-ray export` the checkpoint first)")
    source = Path(checkpoint.root)
    run = RunFolder.at(str(source.parent), config.storage)
    check_trained_on(config, run)
    summary = _json(run, "summary.json") or {}
    with tempfile.TemporaryDirectory(prefix=f".eval-{source.name}-", dir=source.parent) as out:
        export_checkpoint(source, Path(out) / "weights", config=config)
        yield Target(str(Path(out) / "weights"), run, summary.get("data", {}).get("train_examples"),
                     origin=checkpoint.uri)


TRAINED_ON = (("method",), ("model", "name_or_path"), ("model", "revision"), ("model", "add_tokens"),
              ("model", "chat_template"))  # what the base arms and the variant must share


def check_trained_on(config: JobConfig, run: RunFolder) -> None:
    """Refuses a run trained on another base model than the evaluating job names (its
    config.yaml): the base arms would not be the variant's base; and for a distillation job,
    one taught by another teacher than the job names (its teacher arm).

    Raises:
        InputError: naming each key that differs, with both values.
    """
    import yaml

    text = run.read_text("config.yaml")
    if text is None:
        return
    trained, ours = yaml.safe_load(text) or {}, config.model_dump(mode="json")

    def value(tree: dict, key: tuple[str, ...]) -> Any:
        for part in key:
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    keys = TRAINED_ON + ((("distill", "teacher"),) if config.objective == "distill" else ())  # the teacher arm's
    differ = [f"{'.'.join(key)}: {value(trained, key)!r} there, {value(ours, key)!r} here" for key in keys
              if value(trained, key) != value(ours, key) and not _same_folder(value(trained, key), value(ours, key))]
    if differ:
        raise InputError(f"{run.uri} was trained with another model than this job's ({'; '.join(differ)}): "
                         "evaluate it with the job file it was trained with (its config.yaml)")


def _same_folder(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).is_dir() and Path(a).resolve() == Path(b).resolve()


def _json(folder: RunFolder, name: str) -> dict | None:
    import json

    text = folder.read_text(name)
    return json.loads(text) if text else None


# ---------------------------------------------------------------- the data


def held_out_sources(config: JobConfig) -> list[tuple[SourceConfig, str, float | None]]:
    """(source, config key, split): `data.eval` whole, or the eval split of every training
    source (records whose `eval_bucket` is below `data.eval_fraction`)."""
    data = config.data
    if data.eval:
        return [(data.eval_source(), "data.eval", None)]
    if data.eval_fraction == 0:
        raise InputError("data: no held-out examples to evaluate on; set data.eval or data.eval_fraction > 0")
    return [(source, key, data.eval_fraction) for key, source in data.keyed_sources()]


def _keep_held_out(batch: dict[str, np.ndarray], split: float) -> dict[str, np.ndarray]:
    keep = np.array([eval_bucket(str(t)) < split for t in batch["text"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def held_out_dataset(config: JobConfig, source: SourceConfig, key: str, split: float | None) -> Any:
    """The raw held-out records of one source as a Ray Data dataset of small blocks, so the
    scoring spreads over every actor."""
    fs, files = list_files(source, config.storage, key)
    dataset = read_corpus(fs, files, rows_per_block=config.eval.batch_size * 4, spread=True,
                          limits=ReadLimits.of(config.data, source))
    return dataset if split is None else dataset.map_batches(_keep_held_out, fn_kwargs={"split": split},
                                                             batch_format="numpy")


def first_held_out(config: JobConfig, source: SourceConfig, key: str, split: float | None,
                   limit: int) -> Iterator[str]:
    """Keys (file:line) of the first `limit` readable held-out records, read one by one."""
    if limit == 0:
        return
    found = 0
    for path, line, text, error in read_records(source, config.storage, key, ReadLimits.of(config.data, source)):
        if error or (split is not None and eval_bucket(text) >= split):
            continue
        yield record_key(path, line)
        found += 1
        if found == limit:
            return


def training_examples(config: JobConfig, count: int) -> dict[str, list[str]]:
    """The first `count` usable training records (never held-out ones), each as its prompt
    (what retrieval searches) and its shot text (what goes before a prompt), read and parsed
    by Ray Data tasks in file order: the few-shot arm's examples are the first, the retrieval
    arm searches the first `eval.retrieval_pool`."""
    from ft_ray.data.pipeline import task_model_json

    data = config.data
    split = None if data.eval else data.eval_fraction
    pool: dict[str, list[str]] = {"prompts": [], "shots": []}
    for key, source in data.keyed_sources():
        room = count - len(pool["prompts"])
        if room <= 0:
            break
        fmt, _ = choose_format(source, config.storage, key)
        fs, files = list_files(source, config.storage, key)
        rows = read_corpus(fs, files, limits=ReadLimits.of(config.data, source)).map_batches(
            _pool_rows, batch_format="numpy", fn_kwargs={"model_json": task_model_json(config.model), "fmt": fmt,
                                                         "fields": source.fields, "split": split})
        for row in rows.limit(room).take_all():
            pool["prompts"].append(str(row["prompt"]))
            pool["shots"].append(str(row["shot"]))
    return pool


def _pool_rows(batch: dict[str, np.ndarray], model_json: str, fmt: str, fields: dict[str, str],
               split: float | None) -> dict[str, np.ndarray]:
    from ft_ray.data.pipeline import task_tokenizer

    tokenizer = task_tokenizer(model_json)
    prompts, shots = [], []
    for text, error in zip(batch["text"], batch["error"]):
        if split is not None and eval_bucket(str(text)) < split:
            continue
        try:
            segments = record_to_segments(str(text), str(error), fmt, fields, tokenizer)
        except RecordError:
            continue
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        prompts.append("".join(t for t, _ in segments[:first]))
        shots.append(shot_text(segments, tokenizer.eos_token or ""))
    return {"prompt": np.array(prompts, dtype=object), "shot": np.array(shots, dtype=object)}


def count_train_records(config: JobConfig) -> int:
    """Training records that can be read (without the held-out split), counted by Ray Data."""
    split = 0.0 if config.data.eval else config.data.eval_fraction
    total = 0
    for key, source in config.data.keyed_sources():
        fs, files = list_files(source, config.storage, key)
        dataset = read_corpus(fs, files, limits=ReadLimits.of(config.data, source))
        total += int(dataset.map_batches(_count_trained, fn_kwargs={"split": split}, batch_format="numpy").sum("n") or 0)
    return total


def _count_trained(batch: dict[str, np.ndarray], split: float) -> dict[str, np.ndarray]:
    return {"n": np.array([sum(readable(text, error) and (not split or eval_bucket(str(text)) >= split)
                               for text, error in zip(batch["text"], batch["error"]))])}


def held_out_in_training(config: JobConfig) -> int | None:
    """How many `data.eval` records are training records too (`records.example_key`: the same
    record whatever its file, key order, spacing or column names), the training sources read
    by Ray Data tasks; None for an eval split off the training data (a record falls on one
    side with all its copies)."""
    if not config.data.eval:
        return None
    held_out = eval_examples(config)
    keys, found = set(held_out), set()
    for key, source in config.data.keyed_sources():
        fs, files = list_files(source, config.storage, key)
        rows = read_corpus(fs, files, limits=ReadLimits.of(config.data, source)).map_batches(
            _held_out_keys, batch_format="numpy", fn_kwargs={"keys": keys, "fields": source.fields})
        found.update(bytes(row["key"]) for row in rows.take_all())
    return sum(held_out[key] for key in found)


def _held_out_keys(batch: dict[str, np.ndarray], keys: set[bytes], fields: dict[str, str]) -> dict[str, np.ndarray]:
    found = {key for key in (example_key(str(t), fields) for t in batch["text"]) if key in keys}
    return {"key": np.array(sorted(found), dtype=object)}


# ---------------------------------------------------------------- the run


@dataclass
class Scored:
    """The figures of an evaluation, one row per held-out example, where it was written, and
    the training examples its prompting arms used (`training_examples`)."""

    columns: dict[str, np.ndarray]
    uri: str
    examples: dict[str, list[str]]
    in_training: int | None  # held-out records that are training records too (`held_out_in_training`)


def evaluate(config: JobConfig, target: Target) -> dict[str, Any]:
    """Score the arms on the held-out examples, decide, write `eval.json`; returns it. A
    reward model's held-out pairs instead (`evaluate_reward_model`)."""
    if config.scores:
        return evaluate_reward_model(config, target)
    return evaluate_scored(config, target)[0]


def evaluate_scored(config: JobConfig, target: Target, earlier: Scored | None = None) -> tuple[dict[str, Any], Scored]:
    """`evaluate`, also returning the figures. With an `earlier` evaluation of the same job
    (a sweep's other winner: the same base model, examples and settings), only the variant
    is scored; the base and prompting arms' figures, and the training examples they used, are
    that evaluation's."""
    import ray
    import ray.data

    from ft_ray.train.trainer import connect_ray

    started = time.monotonic()
    every = arms_of(config)
    arms = every if earlier is None else tuple(arm for arm in every if arm.model == "variant")
    connect_ray(config)
    settings = config.eval
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    examples = (training_examples(config, max(settings.few_shot, settings.retrieval_pool)) if earlier is None
                else earlier.examples)
    shots = examples["shots"][:settings.few_shot]
    pool = {part: texts[:settings.retrieval_pool] for part, texts in examples.items()}
    actors = actor_count(config)
    arm_names = (f"{len(arms)} arms ({', '.join(arm.label(settings.few_shot) for arm in arms)}; retrieval from "
                 f"{len(pool['prompts'])} training examples)" if earlier is None else
                 f"the variant (the other arms as in {earlier.uri})")

    def arguments(source: SourceConfig, key: str, split: float | None, fmt: str) -> tuple[dict[str, Any], str]:
        gen_keys = list(first_held_out(config, source, key, split, settings.num_generations))
        return ({"job_json": config.model_dump_json(), "variant": target.weights, "shots": shots, "fmt": fmt,
                 "fields": source.fields, "generate_keys": gen_keys, "pool": pool,
                 "arms": tuple(arm.name for arm in arms)},
                f"{arm_names} on {{total}} examples, {len(gen_keys)} answered by each")

    columns = score_held_out(config, ArmScorer, actors, arguments)
    train_examples = target.train_examples if target.train_examples is not None else count_train_records(config)
    in_training = held_out_in_training(config) if earlier is None else earlier.in_training
    cols = {k: np.array(v) for k, v in columns.items()}
    if earlier is not None:
        cols = with_arms_of(earlier, cols, [arm.name for arm in every if arm not in arms])
    result = summarize(config, cols, {"few_shot": len(shots), "retrieval": len(pool["prompts"])}, train_examples,
                       in_training)
    result.update({"variant": target.origin or target.weights, "base_model": config.model.name_or_path,
                   "actors": actors, "retrieval_pool": len(pool["prompts"]),  # the training examples retrieval searched
                   "wall_time_s": round(time.monotonic() - started, 1)})
    if earlier is not None:
        result["other_arms_from"] = earlier.uri
    uri = target.folder.uri_of("eval.json")
    target.folder.write_json("eval.json", result)
    print_result(result, uri)
    return result, Scored(cols, uri, examples, in_training)


def evaluate_reward_model(config: JobConfig, target: Target) -> dict[str, Any]:
    """Score the held-out pairs with the reward model at `target` on Ray Data actors
    (`pairs.PairScorer`), decide (`pairs.summarize_pairs`), write `eval.json`; returns it."""
    from ft_ray.train.trainer import connect_ray

    started = time.monotonic()
    connect_ray(config)
    actors = actor_count(config)
    columns = score_held_out(config, PairScorer, actors, lambda source, _key, _split, fmt: (
        {"job_json": config.model_dump_json(), "variant": target.weights, "fmt": fmt, "fields": source.fields},
        "the reward model's scores of the answers of {total} held-out pairs"))
    result = summarize_pairs(config, {k: np.array(v) for k, v in columns.items()})
    result.update({"variant": target.origin or target.weights, "base_model": config.model.name_or_path,
                   "actors": actors, "wall_time_s": round(time.monotonic() - started, 1)})
    uri = target.folder.uri_of("eval.json")
    target.folder.write_json("eval.json", result)
    arms = result["arms"]
    LOG.info(f"eval on {result['examples']} held-out pairs: the reward model orders "
             f"{arms['variant']['pair_accuracy']:.1%} (mean margin {arms['variant']['mean_margin']:.3g}), the longer "
             f"answer {arms['longer_answer']['pair_accuracy']:.1%}"
             + (f"; not scored: {result['not_scored']}" if result["not_scored"] else ""))
    LOG.info(f"verdict: {result['verdict']['sentence']}")
    LOG.info(f"eval.json: {uri}")
    return result


def with_arms_of(earlier: Scored, cols: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """`cols` with the named arms' columns taken from the earlier evaluation, row by row
    (matched by the example's key)."""
    position = {key: i for i, key in enumerate(earlier.columns["key"].tolist())}
    if set(position) != set(cols["key"].tolist()):
        raise RuntimeError(f"eval: the held-out examples differ from those of {earlier.uri}")
    rows = np.array([position[key] for key in cols["key"].tolist()])
    taken = {column: values[rows] for column, values in earlier.columns.items()
             if any(column.startswith(f"{name}_") for name in names)}
    return {**cols, **taken}


def score_held_out(config: JobConfig, scorer: type, actors: int,
                   arguments: Callable[[SourceConfig, str, float | None, str], tuple[dict[str, Any], str]]
                   ) -> dict[str, list]:
    """Every held-out source's records (`eval.max_examples` of each at most) through `scorer`
    on `actors` Ray Data actors, their rows gathered column by column, with a progress line
    where the console is quiet. `arguments(source, key, split, format)`: the actors'
    constructor arguments, and what the log says they score ("{total}": the records)."""
    import ray.data

    settings = config.eval
    columns: dict[str, list] = {}
    for source, key, split in held_out_sources(config):
        fmt, note = choose_format(source, config.storage, key)
        dataset = held_out_dataset(config, source, key, split)
        if settings.max_examples:
            dataset = dataset.limit(settings.max_examples)
        kwargs, scoring = arguments(source, key, split, fmt)
        scored = dataset.map_batches(
            scorer, batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1, num_gpus=1 if config.distributed.use_gpu else 0, fn_constructor_kwargs=kwargs)
        total = dataset.count()
        LOG.info(f"eval: {note}; {scoring.replace('{total}', str(total))}, on {actors} model actor(s)")
        display = progress.Display("eval", total, "examples") if quiet() else None
        for batch in scored.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
            for name, values in batch.items():
                columns.setdefault(name, []).extend(values.tolist())
            if display:
                display.update(len(columns.get("key", [])))
        if display:
            display.close()
    return columns


def actor_count(config: JobConfig) -> int:
    """`eval.num_actors`, as many as the cluster can hold (leaving a CPU for reading)."""
    import ray

    resources = ray.cluster_resources()
    room = resources.get("GPU", 0) if config.distributed.use_gpu else resources.get("CPU", 1) - 1
    return max(1, min(config.eval.num_actors, int(room)))


def summarize(config: JobConfig, cols: dict[str, np.ndarray], shots_available: dict[str, int],
              train_examples: int, in_training: int | None = None) -> dict[str, Any]:
    """eval.json from one row of figures per example: per-arm figures, cost per request, and
    the variant against every other arm; the verdict is against the strongest prompting arm.
    `in_training`: held-out records that are training records too (warned of)."""
    settings = config.eval
    if not len(cols.get("key", [])):
        raise InputError("eval: the held-out data has no records")
    ok = cols["reason"] == ""
    skipped = {str(r): int(c) for r, c in zip(*np.unique(cols["reason"][~ok], return_counts=True))}
    if not ok.any():
        raise InputError(f"eval: no held-out record could be scored ({skipped})")
    generated = ok & cols["generated"].astype(bool)
    every = arms_of(config)
    arms = {arm.name: arm_figures(cols, arm.name, ok, generated, settings.format_regex is not None,
                                  config.objective == "grpo") for arm in every}
    cost_per_request(arms, settings.price_per_million_tokens)
    k = settings.few_shot
    warnings = []
    for arm in PROMPTING:
        figures = arms[arm.name]
        shots = cols[f"{arm.name}_shots"][ok]
        figures.update({"shots_configured": k, "shots_mean": round(float(shots.mean()), 3),
                        "shots_min": int(shots.min()), "context_tokens": int(cols["context"][ok].max())})
        if shots_available[arm.name] < k:
            warnings.append(f"only {shots_available[arm.name]} usable training examples for {arm.label(k)} prompts")
        if figures["shots_mean"] < min(k, shots_available[arm.name]):
            warnings.append(f"{arm.label(k)} prompts: {figures['shots_mean']:.2g} examples fitted on average within "
                            f"{figures['context_tokens']} tokens (eval.max_prompt_tokens; fewest {figures['shots_min']})")
    if train_examples < FEW_DATA:
        warnings.append(f"the training set has {train_examples} examples (< {FEW_DATA}): fine-tuning rarely pays with "
                        "so few; prefer few-shot prompting unless the verdict is clear")
    if in_training:
        warnings.append(f"{in_training} of the held-out records are training records too (the same record in "
                        "the training data): on them the variant and the retrieval arm show recall, not what was learned; "
                        "take them out of one side")
    pairs = ok & (cols["variant_rejected_tokens"] > 0) if "variant_rejected_tokens" in cols else ok & False
    if pairs.any():
        for arm in every:
            arms[arm.name]["preference_accuracy"] = float(preference_wins(cols, arm.name, pairs).mean())
    choose = {"loss": ok, "preference": pairs}.get(settings.metric, generated)
    if not choose.any():
        raise InputError(f"eval.metric {settings.metric}: no held-out example was "
                         + ("a chosen/rejected pair" if settings.metric == "preference" else
                            "generated (eval.num_generations)"))
    others = {"base": "the base model", "start": "the adapter it trained on from", "teacher": "the teacher"}
    comparisons = {arm.name: decide_against(cols, settings, choose, arm.name, arm.prompting_name(
        k, arms[arm.name]["shots_mean"]) if arm.prompting else others[arm.name]) for arm in every if arm.name != "variant"}
    strongest = strongest_prompting(comparisons, settings.metric)
    ratio = arms["variant"]["tokens_per_request"] / max(arms[strongest]["tokens_per_request"], 1e-9)
    verdict = {**comparisons[strongest], "strongest_prompting_arm": strongest,
               "tokens_per_request_ratio": round(ratio, 3),
               "sentence": f"{comparisons[strongest]['sentence']}; the variant sends {ratio:.2g}x the tokens per request"}
    result = {"metric": settings.metric, "examples": int(ok.sum()), "generated": int(generated.sum()),
              "skipped": skipped, "train_examples": train_examples, "held_out_in_training": in_training, "arms": arms,
              "verdict": verdict, "vs_base": comparisons["base"], "comparisons": comparisons, "warnings": warnings,
              "samples": samples(cols, generated, every), "actors_used": sorted(set(cols["actor"].tolist())),
              "settings": settings.model_dump(mode="json")}
    if "teacher" in comparisons:
        result["teacher_gap_closed"] = gap_closed(comparisons["base"], comparisons["teacher"])
    return result


def gap_closed(base: dict[str, Any], teacher: dict[str, Any]) -> float | None:
    """How much of the way from the base model to the teacher the variant went on the metric
    (the comparisons against each: 0 where the base is, 1 at the teacher, above 1 past it);
    None where the teacher scores as the base does."""
    span = teacher["other"] - base["other"]
    return round((base["variant"] - base["other"]) / span, 3) if span else None


def strongest_prompting(comparisons: dict[str, dict], metric: str) -> str:
    """The prompting arm with the best value of the metric (the verdict is against it)."""
    lower = metric in metrics.LOWER_IS_BETTER
    return min((arm.name for arm in PROMPTING), key=lambda name: comparisons[name]["other"] * (1 if lower else -1))


def cost_per_request(arms: dict[str, dict], price_per_million: float | None) -> None:
    """Each arm's tokens per request (prompt and generated) and the cost of 1,000 requests at
    the price, or (no price) relative to the variant's."""
    for figures in arms.values():
        figures["tokens_per_request"] = round(figures["prompt_tokens_mean"] + (figures.get("generated_tokens_mean") or 0), 2)
    for figures in arms.values():
        if price_per_million:
            figures["cost_per_1000_requests"] = round(1000 * figures["tokens_per_request"] * price_per_million / 1e6, 6)
        else:
            figures["cost_relative_to_variant"] = round(
                figures["tokens_per_request"] / max(arms["variant"]["tokens_per_request"], 1e-9), 3)


def arm_figures(cols: dict[str, np.ndarray], arm: str, ok: np.ndarray, generated: np.ndarray,
                with_format: bool, with_reward: bool = False) -> dict[str, Any]:
    tokens = cols[f"{arm}_tokens"][ok]
    loss = float(cols[f"{arm}_loss_sum"][ok].sum() / max(1, tokens.sum()))
    seconds = float(cols[f"{arm}_gen_s"][generated].sum())
    figures = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": int(tokens.sum()),
               "prompt_tokens_mean": round(float(cols[f"{arm}_prompt_tokens"][ok].mean()), 2)}
    if generated.any():
        new_tokens = cols[f"{arm}_gen_tokens"][generated]
        figures.update({
            "exact_match": float(cols[f"{arm}_exact"][generated].mean()),
            "chrf": float(cols[f"{arm}_chrf"][generated].mean()),
            "format": float(cols[f"{arm}_format"][generated].mean()) if with_format else None,
            "reward": float(cols[f"{arm}_reward"][generated].mean()) if with_reward else None,
            "generated_tokens_mean": round(float(new_tokens.mean()), 2),
            "generation_tokens_per_s": round(float(new_tokens.sum()) / seconds, 1) if seconds else None})
    return figures


def metric_values(cols: dict[str, np.ndarray], arm: str, metric: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example values and weights of the metric (loss: mean per token, weighted by tokens)."""
    if metric == "loss":
        tokens = cols[f"{arm}_tokens"][rows].astype(np.float64)
        return cols[f"{arm}_loss_sum"][rows] / np.maximum(tokens, 1), tokens
    if metric == "preference":
        wins = preference_wins(cols, arm, rows)
        return wins, np.ones_like(wins)
    column = {"exact_match": "exact", "chrf": "chrf", "format": "format", "reward": "reward"}[metric]
    values = cols[f"{arm}_{column}"][rows].astype(np.float64)
    return values, np.ones_like(values)


def preference_wins(cols: dict[str, np.ndarray], arm: str, rows: np.ndarray) -> np.ndarray:
    """Per pair, 1.0 when the arm gives the chosen answer a higher length-normalised
    likelihood (lower loss per token) than the rejected one, else 0.0."""
    chosen = cols[f"{arm}_loss_sum"][rows] / np.maximum(cols[f"{arm}_tokens"][rows], 1)
    rejected = cols[f"{arm}_rejected_loss_sum"][rows] / np.maximum(cols[f"{arm}_rejected_tokens"][rows], 1)
    return (chosen < rejected).astype(np.float64)


def decide_against(cols: dict[str, np.ndarray], settings: Any, rows: np.ndarray, other: str,
                   other_name: str) -> dict[str, Any]:
    """The variant against another arm on `eval.metric`, with the paired bootstrap interval
    (against the adapter it trained on from: did this run pay over its start?)."""
    ours, weights = metric_values(cols, "variant", settings.metric, rows)
    theirs, _ = metric_values(cols, other, settings.metric, rows)
    lower = settings.metric in metrics.LOWER_IS_BETTER
    difference, low, high = metrics.paired_bootstrap(ours, theirs, weights, settings.bootstrap_samples,
                                                     settings.seed, lower_is_better=lower)
    # against the start: did this run pay over it; against the teacher: no such question
    paying = {"start": {"not_paying": "this run's training does not pay over it"}, "teacher": {"not_paying": ""}}
    return metrics.verdict(settings.metric, metrics.weighted_mean(ours, weights), metrics.weighted_mean(theirs, weights),
                           difference, low, high, other_name, **paying.get(other, {}))


def samples(cols: dict[str, np.ndarray], generated: np.ndarray, arms: tuple) -> list[dict[str, str]]:
    rows = np.flatnonzero(generated)[:SAMPLES_KEPT]
    return [{"key": str(cols["key"][i]), "prompt": str(cols["prompt"][i]), "reference": str(cols["reference"][i]),
             **{arm.name: str(cols[f"{arm.name}_answer"][i]) for arm in arms}} for i in rows]


def print_result(result: dict[str, Any], where: str) -> None:
    arms = result["arms"]
    k = result["settings"]["few_shot"]
    pairs = arms["variant"].get("preference_accuracy") is not None
    rewarded = arms["variant"].get("reward") is not None  # a grpo run
    cost = "cost/1k" if "cost_per_1000_requests" in arms["variant"] else "cost x"
    rows = [f"{'arm':<18}{'loss':>8}{'ppl':>9}{'exact':>7}{'chrF':>7}{'format':>8}" + (f"{'pref':>7}" if pairs else "")
            + (f"{'reward':>8}" if rewarded else "") + f"{'tok/request':>13}{cost:>9}{'tok/s':>8}"]
    for arm in ALL_ARMS:
        f = arms.get(arm.name)
        if f is None:  # an eval.json written before this arm existed, or without a start adapter
            continue
        cells = [_cell(f.get(name), spec) for name, spec in
                 (("exact_match", ".2f"), ("chrf", ".2f"), ("format", ".2f"), ("preference_accuracy", ".2f"),
                  ("reward", ".3f"))]
        price = f.get("cost_per_1000_requests", f.get("cost_relative_to_variant"))
        rows.append(f"{arm.label(k):<18}{f['loss']:>8.3f}{f['perplexity']:>9.2f}{cells[0]:>7}{cells[1]:>7}{cells[2]:>8}"
                    + (f"{cells[3]:>7}" if pairs else "") + (f"{cells[4]:>8}" if rewarded else "")
                    + f"{f['tokens_per_request']:>13.1f}{_cell(price, '.3g'):>9}"
                    + f"{_cell(f.get('generation_tokens_per_s'), '.0f'):>8}")
    LOG.info(f"eval on {result['examples']} held-out examples ({result['generated']} answered by each arm):\n"
             + "\n".join(f"[ft-ray]   {row}" for row in rows))
    for sample in result["samples"][:1]:
        LOG.info("a held-out prompt:\n" + _indent(sample["prompt"]))
        for arm in ALL_ARMS:
            if arm.name in sample:
                LOG.info(f"{arm.label(k)} answers:\n" + _indent(sample[arm.name]))
    for warning in result["warnings"]:
        LOG.warning(f"{warning}")
    LOG.info(f"vs base: {result['vs_base']['sentence']}")
    if "start" in result["comparisons"]:
        LOG.info(f"vs the adapter it trained on from: {result['comparisons']['start']['sentence']}")
    if "teacher" in result["comparisons"]:
        gap = result.get("teacher_gap_closed")
        closed = f" (the variant went {gap:.0%} of the way from the base model to it)" if gap is not None else ""
        LOG.info(f"vs the teacher: {result['comparisons']['teacher']['sentence']}{closed}")
    LOG.info(f"verdict: {result['verdict']['sentence']}")
    LOG.info(f"eval.json: {where}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines() if line.strip())


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------- sweeps


def evaluate_sweep(config: JobConfig, path: str) -> dict[str, Any]:
    """Evaluate every exported winner of a sweep; winner.json and sweep.json carry the
    verdicts. Returns sweep.json as updated."""
    sweep = RunFolder.at(path, config.storage)
    summary = _json(sweep, "sweep.json")
    if summary is None:
        raise InputError(f"{sweep.uri}: no sweep.json (not a finished sweep)")
    first = None
    for i, entry in enumerate(summary["winners"]):
        name = check_folder_name(str(entry.get("uri", "")).rstrip("/").rsplit("/", 1)[-1],
                                 f"{sweep.uri_of('sweep.json')}: winners[{i}].uri")
        folder = RunFolder.at(sweep.uri_of("winners", name), config.storage)
        # the base and prompting arms are the same for every winner: scored for the first only
        with resolve_target(folder.uri, config) as target:
            if config.scores:  # a reward model: its pairs against the longer answer, no arms to share
                result = evaluate_reward_model(config, target)
                brief = {"kind": result["kind"], "verdict": result["verdict"], "arms": result["arms"]}
            else:
                result, scored = evaluate_scored(config, target, first)
                first = first or scored
                brief = {"verdict": result["verdict"], "vs_base": result["vs_base"],
                         "comparisons": result["comparisons"],
                         "arms": {arm: {k: v for k, v in f.items()
                                        if k in ("loss", "exact_match", "chrf", "format", "preference_accuracy")}
                                  for arm, f in result["arms"].items()}}
        winner = _json(folder, "winner.json") or {}
        folder.write_json("winner.json", {**winner, "eval": brief})
        entry["eval"] = brief
    sweep.write_json("sweep.json", summary)
    return summary
