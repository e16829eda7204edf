"""`ft-ray`: the command line. Each command is a few lines over the library.

Exit codes: 0 done, 1 the job failed, 2 the input is wrong (config, data, paths),
130 interrupted.

`train`, `tune`, `eval` and `prepare` print ft-ray's own lines only and send Ray's output to
a log file in the run folder (`console.quiet_session`); `--verbose` or `FT_RAY_VERBOSE=1`
shows everything. A failure prints its root cause and the log's path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

from ft_ray.config import ConfigError, InputError, JobConfig, load_config
from ft_ray.console import LOG, TERMINAL, log_file_for, quiet_session, report_failure, verbose_requested
from ft_ray.storage import StorageError, for_preflight, model_copy_bytes

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: list[str] | None = None, capture: bool = False) -> int:
    """Run a command. `capture` (the console script) quiets Ray into a log file and turns an
    unexpected exception into its root cause and exit code 1; a library caller (tests)
    gets the plain streams and the exception itself."""
    args = _parser().parse_args(argv)
    args.quiet = capture and not verbose_requested(getattr(args, "verbose", False))
    args.log_file = None
    with ExitStack() as session:
        args.session = session
        try:
            return args.handler(args)
        except ConfigError as e:
            for problem in e.problems:
                LOG.error(problem)
            return EXIT_BAD_INPUT
        except InputError as e:
            LOG.error(str(e))
            return EXIT_BAD_INPUT
        except StorageError as e:
            LOG.error(str(e))
            return EXIT_FAILED
        except KeyboardInterrupt:
            LOG.error("interrupted" + (f"; the log: {args.log_file}" if args.log_file else ""))
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # what reads the output went away (`ft-ray plan JOB | head -3`): stop quietly
            if not capture:
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails no more
            return EXIT_FAILED
        except Exception as e:
            if not capture:
                raise
            if args.log_file is None:  # --verbose: the whole traceback here, then its root cause
                traceback.print_exc()
            report_failure(e, args.log_file)
            return EXIT_FAILED


def _quiet(args: argparse.Namespace, folder: Any) -> None:
    """From here on, Ray's output goes to the log of `folder` (unless verbose or a library call)."""
    if args.quiet:
        log_file, copy_to = log_file_for(folder, args.command)
        args.log_file = args.session.enter_context(quiet_session(log_file, copy_to, process_ends=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ft-ray", description="Distributed fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune as a job file says (resumes a run of the same name)")
    _config_args(train)
    train.add_argument("--force-new", action="store_true",
                       help="the run folder holds another job's checkpoints: move it aside and start over")
    train.set_defaults(handler=cmd_train)

    tune = commands.add_parser("tune", help="search job settings with Ray Tune (tune: section); exports the winners")
    _config_args(tune)
    tune.add_argument("--resume", action="store_true", help="finish an interrupted sweep of the same name")
    tune.add_argument("--force", action="store_true",
                      help="run even when the largest trial's memory plan does not fit the cluster's GPUs (RAY_ADDRESS)")
    tune.set_defaults(handler=cmd_tune)

    report = commands.add_parser("report", help="HTML page and PNGs of a sweep or a run (loss curves, metric vs settings)")
    report.add_argument("path", help="sweep or run folder (local or s3://)")
    report.add_argument("--out", type=Path, help="folder to write (default: <path>/report, or ./report-<name> for s3://)")
    report.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths (default AWS_ENDPOINT_URL)")
    report.set_defaults(handler=cmd_report)

    evaluate = commands.add_parser("eval", help="does fine-tuning pay? the variant vs the base model and vs few-shot "
                                                "prompting of it, on held-out data (writes eval.json)")
    _config_args(evaluate)
    what = evaluate.add_mutually_exclusive_group()
    what.add_argument("--run", help="run folder, checkpoint, sweep winner or adapter/model folder, local or s3:// "
                                    "(default: the job's run folder)")
    what.add_argument("--sweep", help="sweep folder: evaluate every exported winner")
    evaluate.set_defaults(handler=cmd_eval)

    prepare = commands.add_parser("prepare", help="tokenize and pack the job's data to Parquet in storage "
                                                  "(later runs with the same data skip this)")
    _config_args(prepare)
    prepare.set_defaults(handler=cmd_prepare)

    validate = commands.add_parser("validate", help="check a job file and peek at its data")
    _config_args(validate)
    validate.add_argument("--offline", action="store_true", help="check the config only; skip what needs data or network")
    validate.set_defaults(handler=cmd_validate)

    plan = commands.add_parser("plan", help="will the job fit? per-worker GPU memory, part by part, from the "
                                            "model's config.json (no weights loaded, no GPU needed)")
    _config_args(plan)
    plan.add_argument("--gpu-memory", type=float, metavar="GB",
                      help="the GPU's memory in GB (e.g. 24, 80): does the job fit it, and what would")
    plan.add_argument("--json", action="store_true", help="one JSON object: peak_mib, every part, fits, suggestions")
    plan.add_argument("--gpu-type", default="H100", help="the GPU the time is estimated for (default H100)")
    plan.add_argument("--train-tokens", type=token_count, metavar="N",
                      help="training tokens per epoch: 250000000, 2.5e8 or 250M (default: counted from the data)")
    plan.add_argument("--price-per-gpu-hour", type=float, metavar="USD", help="also say what the run costs")
    plan.set_defaults(handler=cmd_plan)

    export = commands.add_parser("export", help="write a run's adapter or merged model to a folder")
    export.add_argument("path", type=Path, help="run folder or checkpoint folder")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base weights")
    export.add_argument("--overwrite", action="store_true", help="replace what --out holds (else it must be new or empty)")
    export.set_defaults(handler=cmd_export)

    runs = commands.add_parser("runs", help="the runs and sweeps under a storage path: steps, eval loss, "
                                            "finished, running or what a relaunch resumes from")
    runs.add_argument("path", nargs="?", default="./runs", help="storage.path of the jobs, local or s3:// "
                                                                "(default ./runs)")
    runs.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths (default AWS_ENDPOINT_URL)")
    runs.add_argument("--json", action="store_true", help="one JSON object per run or sweep")
    runs.set_defaults(handler=cmd_runs)

    generate = commands.add_parser("generate", help="answer your prompts with the variant (and the base model): "
                                                    "typed, given, or a file of records")
    generate.add_argument("path", help="run folder, checkpoint, sweep winner or adapter/model folder "
                                       "(local, or s3:// with --config)")
    generate.add_argument("--config", help="the job that trained it (default: the run's config.yaml)")
    generate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of --config (repeatable)")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); without --prompt or "
                        "--file: one per line from stdin, typed at a '> ' where it is a terminal")
    source.add_argument("--file", type=Path, help="JSONL records in a training format: their prompts are answered "
                        "and their answers shown as the reference")
    generate.add_argument("--format", choices=["chat", "instruction", "completion"],
                          help="how a prompt is put to the model (default: as the run's training data was; "
                               "completion: as written)")
    generate.add_argument("--compare", action="store_true", help="the base model's answer beside the variant's (and the adapter a run trained on from, model.adapter)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampled")
    generate.add_argument("--seed", type=int, default=0, help="of the sampling")
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt as the model saw "
                          "it, reference, variant, base")
    generate.add_argument("--verbose", action="store_true", help="the libraries' output here, not in the log file")
    generate.set_defaults(handler=cmd_generate)
    submit = commands.add_parser("submit", help="run a job file on a Ray cluster (Ray Jobs API)")
    _config_args(submit)
    submit.add_argument("--address", help="dashboard URL, e.g. http://head:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--tune", action="store_true", help="run `ft-ray tune` instead of `ft-ray train`")
    submit.add_argument("--working-dir", type=Path, default=Path("."), help="folder uploaded with the job")
    submit.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    submit.add_argument("--in-place", action="store_true",
                        help="no upload: the working dir is at the same path on every node (shared mount, image)")
    submit.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's outcome")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the entrypoint and what would be uploaded (files, size, excludes); submit nothing")
    submit.add_argument("--force", action="store_true",
                        help="submit even when the job's memory plan does not fit the cluster's GPUs")
    submit.set_defaults(handler=cmd_submit)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="job YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (logs, Ray Data bars, workers) here instead of in the log "
                             "file (also FT_RAY_VERBOSE=1)")


def token_count(text: str) -> int:
    """A positive number of tokens: 250000000, 2.5e8, 250M, 1.2B or 500k."""
    scale = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9, "t": 10 ** 12}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = 0
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 250000000, 2.5e8, 250M)")
    return round(value)


def load_job(args: argparse.Namespace) -> JobConfig:
    """The job file with its `--set` settings, and the LoRA settings of the adapter it trains
    on from (`model.adapter`, `models.with_adapter`)."""
    from ft_ray.models import with_adapter

    return with_adapter(load_config(args.config, args.overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from ft_ray.storage import RunFolder
    from ft_ray.train.trainer import check_same_job, run_training

    config = load_job(args)
    run = RunFolder.for_job(config)
    check_same_job(config, run, args.force_new)  # before the log opens in the run folder (--force-new moves it)
    _quiet(args, run)
    summary = run_training(config)
    _print_outcome(config, summary)
    weights = summary["adapter_path"] or summary["model_path"]
    if config.train.compare_generations and weights and "://" not in weights:  # generations need local weights
        _print_samples(config, summary)
    if config.eval.after_training:
        from ft_ray.evaluation.evaluate import evaluate, resolve_target

        with resolve_target(summary["run_folder"], config) as target:
            evaluate(config, target)
    return 0


def _print_outcome(config: JobConfig, summary: dict) -> None:
    if config.objective == "grpo":  # its eval loss is minus the reward
        outcome = (f"held-out reward {summary['eval_reward_initial']:.3f} before → {summary['eval_reward_final']:.3f} "
                   f"after (greedy answers; grpo.rewards {config.grpo.rewards})")
    elif config.scores:
        outcome = (f"held-out pairs scored in order {summary['eval_reward_accuracy_initial']:.0%} before → "
                   f"{summary['eval_reward_accuracy_final']:.0%} after (eval loss {summary['eval_loss_initial']:.4f} "
                   f"→ {summary['eval_loss_final']:.4f})")
    else:
        outcome = (f"eval loss {summary['eval_loss_initial']:.4f} before → {summary['eval_loss_final']:.4f} after "
                   f"({summary['eval_loss_reduction']:.0%} lower)")
    epochs = f" ({summary['epochs']:.2f} epochs)" if summary.get("epochs") is not None else ""
    LOG.info(f"{outcome}, {summary['steps']} steps{epochs}, {summary['tokens_per_second']:.0f} tokens/s, "
             f"{summary['wall_time_s']:.0f} s")
    if config.objective == "distill":
        LOG.info(f"held-out divergence from the teacher {summary['eval_divergence_initial']:.4f} before → "
                 f"{summary['eval_divergence_final']:.4f} after; next-token loss of the answers "
                 f"{summary['eval_next_token_loss_initial']:.4f} → {summary['eval_next_token_loss_final']:.4f}")
    for name, scored in (summary.get("eval_sets") or {}).items():
        change = scored["loss_change"]
        LOG.info(f"eval set {name}: loss {scored['loss_initial']:.4f} before → {scored['loss_final']:.4f} after"
                 + (f" ({abs(change):.1%} {'higher' if change > 0 else 'lower'})" if change is not None else ""))
    stop = summary.get("early_stopping")
    if stop:
        LOG.info(f"stopped early at step {stop['step']} of {summary['planned_steps']}: eval loss "
                 f"{stop['best_eval_loss']:.4f} at step {stop['best_step']} was not lowered by "
                 f"{stop['evaluations_without_gain']} evaluations since (train.early_stopping_patience)")
    LOG.info(f"summary: {summary['run_folder']}/summary.json")


def _print_samples(config: JobConfig, summary: dict) -> None:
    from ft_ray.samples import compare_generations
    from ft_ray.storage import RunFolder

    samples = compare_generations(config, summary["adapter_path"] or summary["model_path"],
                                  config.train.compare_generations)
    RunFolder.for_job(config).write_json("samples.json", samples)
    for sample in samples:
        LOG.info("prompt:\n" + sample["prompt"].rstrip())
        LOG.info("base model says:\n" + sample["base"].strip())
        LOG.info("fine-tuned variant says:\n" + sample["variant"].strip())


def cmd_tune(args: argparse.Namespace) -> int:
    from ft_ray.tune import run_sweep, sweep_folder

    config = load_job(args)
    if not args.force:
        from ft_ray.submit import check_fit

        check_fit(config, None, args.config)  # the cluster RAY_ADDRESS names
    _quiet(args, sweep_folder(config))
    summary = run_sweep(config, resume=args.resume)
    stopped = sum(t["stopped_early"] for t in summary["trials"])
    LOG.info(f"{len(summary['trials'])} trials ({stopped} stopped early); sweep.json: {summary['sweep']}/sweep.json")
    for winner in summary["winners"]:
        value = winner["metrics"].get(summary["metric"])
        LOG.info(f"#{winner['rank']} {winner['trial']} {summary['metric']} "
                 f"{f'{value:.4g}' if isinstance(value, float) else value}: {winner['uri']}")
    for winner in summary["winners"]:
        if winner.get("eval"):
            LOG.info(f"#{winner['rank']}: {winner['eval']['verdict']['sentence']}")
    return 0


def refuse_reward_model(config: JobConfig, command: str, what: str) -> None:
    """Raises InputError for a reward model's job: it scores texts and generates nothing."""
    if config.scores:
        raise InputError(f"ft-ray {command} {what}; {config.run_name} is a reward model (objective reward_model), "
                         "which generates none: ft-ray eval scores its held-out pairs, and grpo.rewards takes it as "
                         "model:<its adapter or model folder>")


def cmd_eval(args: argparse.Namespace) -> int:
    from ft_ray.evaluation.evaluate import evaluate, evaluate_sweep, resolve_target
    from ft_ray.storage import RunFolder

    from ft_ray.models import with_start_adapter

    config = with_start_adapter(load_config(args.config, args.overrides))  # the adapter a run trained on from
    _quiet(args, RunFolder.for_job(config))
    if args.sweep:
        for winner in evaluate_sweep(config, args.sweep)["winners"]:
            LOG.info(f"#{winner['rank']} {winner['trial']}: {winner['eval']['verdict']['sentence']}")
    else:
        with resolve_target(args.run or RunFolder.for_job(config).uri, config) as target:
            evaluate(config, target)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ft_ray.report import write_report

    page = write_report(args.path, args.out, args.endpoint_url)
    print(f"report: {page}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ft_ray.data.pipeline import stats_table
    from ft_ray.data.prepared import location, prepare
    from ft_ray.models import load_tokenizer
    from ft_ray.storage import RunFolder
    from ft_ray.train.trainer import connect_ray

    config = load_job(args)
    _quiet(args, RunFolder.for_job(config))
    tokenizer, where = load_tokenizer(config.model), location(config)  # what is not there is said before Ray starts
    connect_ray(config, gpus=config.precomputes)  # packing needs no GPU; a reference or teacher pass does
    _, stats, where = prepare(config, tokenizer, where)
    LOG.info(f"prepared data at {where}:\n{stats_table(stats)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ft_ray.tracking import check_wandb_login
    from ft_ray.validate import validate_data

    config = load_job(args)
    if config.tune:
        from ft_ray.tune import check_search_space

        check_search_space(config)
    print(f"config ok: {args.config} (run {config.run_name}, method {config.method}, "
          f"workers {config.distributed.num_workers})")
    try:
        check_wandb_login(config)
    except InputError as e:
        print(f"warning: {e}")
    if config.objective == "grpo":
        from ft_ray.evaluation.metrics import check_rewards

        try:  # each worker imports the job's own reward functions as this does
            check_rewards(config.grpo.rewards, config.storage)
            print(f"grpo: rewards {', '.join(f'{name} x {weight:g}' for name, weight in config.grpo.rewards.items())}")
        except InputError as e:
            print(f"problem: {e}")
    if not args.offline and config.objective == "distill":
        from ft_ray.models import load_tokenizer
        from ft_ray.train.distillation import check_teacher

        try:  # each worker loads the teacher whole
            print(check_teacher(config, load_tokenizer(config.model)))
        except InputError as e:
            print(f"problem: {e}")
    if not args.offline:
        report = validate_data(for_preflight(config))
        print(json.dumps(report["counts"]))
        for line in report["lines"]:
            print(line)
    print(plan_line(config))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The job's per-worker memory plan; exit 2 when it does not fit `--gpu-memory`."""
    from ft_ray.plan import (ACTIVATION_MARGIN, as_json, describe, describe_loading, describe_time, loading_memory,
                             model_shape, plan_time, suggestions, teacher_pass, train_tokens, worst_case)

    config = load_job(args)
    shape, origin = model_shape(config)
    job, plan = worst_case(config, shape)
    ahead = teacher_pass(job)  # a distill job's teacher run before training, on model actors
    loading = loading_memory(job, shape)
    gpu_mib = args.gpu_memory * 1e9 / 2 ** 20 if args.gpu_memory else None
    gpu_name = f"a {args.gpu_memory:g} GB GPU" if args.gpu_memory else ""
    if gpu_mib is None and job.distributed.use_gpu and os.environ.get("RAY_ADDRESS"):
        from ft_ray.plan import smallest_gpu

        kinds, gpu_mib = smallest_gpu(os.environ["RAY_ADDRESS"])  # the cluster's smallest known GPU
        gpu_name = f"the cluster's smallest GPU ({kinds})"
    fixes = suggestions(job, shape, gpu_mib) if gpu_mib and not plan.fits(gpu_mib) else []
    time, time_line = None, "time: estimated for GPU jobs (distributed.use_gpu: true)"
    if job.distributed.use_gpu:
        try:
            tokens, source = ((args.train_tokens, "--train-tokens") if args.train_tokens
                              else train_tokens(for_preflight(job)))
            time = plan_time(job, shape, tokens, args.gpu_type)
            time_line = describe_time(job, time, source, args.price_per_gpu_hour)
        except InputError as e:
            time_line = f"time: not estimated ({e}; give --train-tokens)"
    stored = config.model.name_or_path.startswith("s3://")
    if args.json:
        copied = {"model_copy_bytes": model_copy_bytes(config.model.name_or_path, config.storage)} if stored else {}
        teacher = {"teacher_pass_peak_mib": round(ahead.peak_mib),
                   "teacher_pass_fits": None if gpu_mib is None else ahead.fits(gpu_mib)} if ahead else {}
        loads = None if loading is None else {"rank0": round(loading.rank0_mib),
                                              "other_workers": round(loading.others_mib), "how": loading.how}
        print(json.dumps({**as_json(job, plan, gpu_mib, fixes), "time": time, **copied, **teacher,
                          "loading_mib": loads}))
    else:
        if job is not config:
            print("sweep: the trial with the most memory over the search space's edges")
        print(describe(job, plan))
        if loading:
            print(describe_loading(loading))
        on_cpu = [*([f"a mixture of experts' layers ({shape.experts} experts, {shape.experts_per_token} per token)"]
                    if shape.experts else []), *(["latent attention"] if shape.kv_rank else [])]
        checked = f"; {' and '.join(on_cpu)} checked on CPU only" if on_cpu else ""
        print(f"(model shape from {origin}; activations: what each layer keeps for backward x {ACTIVATION_MARGIN}, "
              f"measured on an H100{checked})")
        if gpu_mib:
            verdict = "fits" if plan.fits(gpu_mib) else "does NOT fit"
            print(f"{verdict} {gpu_name} ({gpu_mib / 1024:.1f} GiB)")
            for settings, fixed in fixes:
                print(f"  would fit with --set {' --set '.join(settings.split(', '))}: peak {fixed.peak_mib / 1024:.1f} GiB")
            if not plan.fits(gpu_mib) and not fixes:
                print("  no change tried (micro batch, gradient checkpointing, ZeRO, CPU offload, QLoRA) makes it fit")
        if ahead:
            fit = "" if gpu_mib is None else (" (fits" if ahead.fits(gpu_mib) else " (does NOT fit") + f" {gpu_name})"
            print(f"teacher pass before training (distill.teacher_logits: precomputed), per model actor: teacher "
                  f"{ahead.parts['teacher_weights']:,.0f} MiB, its forward {ahead.parts['teacher_forward']:,.0f} MiB, "
                  f"peak {ahead.peak_mib:,.0f} MiB{fit}")
        print(time_line)
        if stored:
            print(model_copy_line(config))
    fits = gpu_mib is None or (plan.fits(gpu_mib) and (ahead is None or ahead.fits(gpu_mib)))
    return 0 if fits else EXIT_BAD_INPUT


def model_copy_line(config: Any) -> str:
    """What each node that trains an s3:// model copies to its model cache first."""
    from ft_ray.storage import size_text

    copied = size_text(model_copy_bytes(config.model.name_or_path, config.storage))
    return (f"disk: each node copies {copied} of {config.model.name_or_path} to storage.model_cache "
            f"({config.storage.model_cache}) once, before its workers load it")


def plan_line(config: Any) -> str:
    """`ft-ray plan` in one line, from what is on this machine (no network)."""
    from ft_ray.plan import model_shape, one_line, teacher_shape, worst_case

    try:
        shape, _ = model_shape(config, network=False)
        teacher_shape(config, network=False)  # kept for the plan
    except InputError as e:
        return f"plan: not made ({e})"
    return one_line(worst_case(config, shape)[1]) + " (ft-ray plan for every part)"


def cmd_submit(args: argparse.Namespace) -> int:
    from ft_ray.submit import submit

    _, status = submit(args.config, args.address, args.overrides, tune=args.tune, working_dir=args.working_dir,
                       pip=args.pip or None, wait=args.wait, in_place=args.in_place, dry_run=args.dry_run,
                       force=args.force)
    if args.wait:
        print(f"job {status}")
        return 0 if status.endswith("SUCCEEDED") else EXIT_FAILED
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ft_ray.config import StorageConfig
    from ft_ray.export import export_checkpoint, find_checkpoint
    from ft_ray.storage import RunFolder

    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file: name a folder to write the model to")
    held = sorted(p.name for p in args.out.iterdir()) if args.out.is_dir() else []
    if held and not args.overwrite:
        raise InputError(f"--out {args.out} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                         "choose a new folder, or --overwrite to replace what it holds")
    checkpoint = find_checkpoint(args.path)
    _quiet(args, RunFolder.at(str(checkpoint.parent), StorageConfig()))  # the libraries' lines
    out = export_checkpoint(checkpoint, args.out, merge=args.merge)
    LOG.info(f"exported {'merged model' if args.merge else 'weights'} to {out}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from ft_ray.config import StorageConfig
    from ft_ray.runs import list_runs, table

    records = list_runs(args.path, StorageConfig(endpoint_url=args.endpoint_url))
    if args.json:
        print("\n".join(json.dumps(r) for r in records))
    elif records:
        print(table(records))
    else:
        LOG.info(f"no runs or sweeps in {args.path} (folders with the config.yaml ft-ray writes)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ft_ray.evaluation.evaluate import resolve_target
    from ft_ray.generate import Answerer, Settings, answers, job_of, prompt_format, records_of, render
    from ft_ray.samples import split_prompt
    from ft_ray.storage import RunFolder, local_folder

    config = job_of(args.path, args.config, args.overrides)
    refuse_reward_model(config, "generate", "answers prompts")
    settings = Settings(args.max_new_tokens, args.temperature, args.compare)
    _quiet(args, RunFolder.for_job(config))
    with resolve_target(args.path, config) as target, \
            local_folder(target.weights, config.storage, "ft-ray-variant-") as weights:
        answerer = Answerer(config, weights, settings)
        fmt = args.format or prompt_format(config, answerer.tokenizer)
        how = "greedy" if not args.temperature else f"sampled at temperature {args.temperature}"
        LOG.info(f"generate: {target.origin or target.weights} (prompts as {fmt}; {how}, at most "
                 f"{args.max_new_tokens} new tokens)")
        torch.manual_seed(args.seed)
        if args.file:
            prompts = (split_prompt(record, found, answerer.tokenizer)
                       for found, record in records_of(args.file, config))
        else:
            typed = args.prompt or _typed_prompts()
            prompts = ((render(text, fmt, answerer.tokenizer), None) for text in typed)
        out = TERMINAL.stream()
        for result in answers(answerer, prompts):
            if args.json:
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
            else:
                for key in ("prompt", "reference", "variant", "start", "base"):
                    if key in result and (key != "prompt" or args.file or args.prompt):
                        out.write(f"{key}: {result[key].strip()}\n")
                out.write("\n")
            out.flush()
    return 0


def _typed_prompts() -> Iterator[str]:
    """Prompts from stdin, one per line; at a terminal each asked for with '> ' (Ctrl-D ends)."""
    if not sys.stdin.isatty():
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())
        return
    while True:
        TERMINAL.stream().write("> ")
        TERMINAL.stream().flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def main_exit() -> None:
    """Console-script entry point: exit with `main`'s code."""
    sys.exit(main(capture=True))
