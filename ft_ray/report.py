"""`ft-ray report`: a page people look at. For a sweep: loss curves of every trial, the metric
against each searched setting, the winners and all trials in tables. For a run: its curves
and summary. Reads local folders and s3:// alike; writes `index.html` and PNGs to a folder.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ft_ray.config import InputError, StorageConfig, check_folder_name
from ft_ray.storage import RunFolder, read_metrics


def write_report(path: str, out: Path | None = None, endpoint_url: str | None = None) -> Path:
    """Write the report of a sweep or run folder; returns the page's path. `endpoint_url`:
    an S3-compatible store's (default AWS_ENDPOINT_URL, else AWS).

    Raises:
        InputError: the folder holds neither `sweep.json` nor `metrics.jsonl`.
    """
    folder = RunFolder.at(str(path), StorageConfig(endpoint_url=endpoint_url))
    if out is None:
        out = Path(folder.root) / "report" if folder.is_local else Path(f"report-{Path(folder.root).name}")
    out.mkdir(parents=True, exist_ok=True)
    sweep = folder.read_text("sweep.json")
    if sweep:
        body = sweep_report(folder, json.loads(sweep), out)
    elif folder.read_text("metrics.jsonl") is not None:
        body = run_report(folder, out)
    else:
        raise InputError(f"{folder.uri}: neither a sweep (sweep.json) nor a run folder (metrics.jsonl)")
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>ft-ray report: {html.escape(folder.uri)}"
                    f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n", encoding="utf-8")
    return page


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}img{max-width:100%}")


def sweep_report(sweep: RunFolder, summary: dict, out: Path) -> str:
    trials = summary["trials"]
    where = f"{sweep.uri_of('sweep.json')}: trial"
    curves = {t["trial"]: read_metrics(sweep.child("trials", check_folder_name(t["trial"], where))) for t in trials}
    base = base_eval_loss(curves)
    plot_curves(curves, out / "loss_curves.png", base)
    keys = sorted({k for t in trials for k in t["config"]})
    metric = summary["metric"]
    plot_metric_vs_settings(trials, keys, metric, {w["trial"] for w in summary["winners"]}, out / "metric_vs_settings.png",
                            base if metric == "eval_loss" else None)
    winners = table(["rank", "trial", metric, "variant"],
                    [[w["rank"], w["trial"], w["metrics"].get(metric), relative(w["uri"], sweep.uri)]
                     for w in summary["winners"]])
    rows = table(["trial", "status", "step", metric, *keys],
                 [[t["trial"], t["status"] + (" (stopped early)" if t["stopped_early"] else ""), t["step"],
                   t["metrics"].get(metric), *[t["config"].get(k) for k in keys]] for t in trials])
    stopped = sum(t["stopped_early"] for t in trials)
    evaluated = {w["trial"]: w["eval"] for w in summary["winners"] if w.get("eval")}
    return (f"<h1>Sweep {html.escape(sweep.uri)}</h1><p>{len(trials)} trials, {stopped} stopped early; "
            f"ranked by {html.escape(metric)} ({html.escape(str(summary['mode']))}).</p><h2>Winners</h2>{winners}"
            + arms_section(evaluated, out) +
            f"<h2>Loss curves</h2><img src='loss_curves.png'><h2>{html.escape(metric)} against the searched settings</h2>"
            f"<img src='metric_vs_settings.png'><h2>All trials</h2>{rows}")


def base_eval_loss(curves: dict[str, list[dict]]) -> float | None:
    """The base model's eval loss: every run's eval at step 0 (before any training)."""
    at_zero = [m["eval_loss"] for metrics in curves.values() for m in metrics
               if m.get("step") == 0 and isinstance(m.get("eval_loss"), (int, float))]
    return at_zero[0] if at_zero else None


def relative(uri: str, root: str) -> str:
    """`uri` under `root` as a path relative to it (`winners/1-...`), else as it is."""
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def run_report(run: RunFolder, out: Path) -> str:
    curves = {Path(run.root).name: read_metrics(run)}
    plot_curves(curves, out / "loss_curves.png", base_eval_loss(curves))
    summary = json.loads(run.read_text("summary.json") or "{}")
    evaluation = json.loads(run.read_text("eval.json") or "null")
    shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    return (f"<h1>Run {html.escape(run.uri)}</h1>"
            + arms_section({Path(run.root).name: evaluation} if evaluation else {}, out)
            + "<h2>Loss curves</h2><img src='loss_curves.png'>"
            + table(["key", "value"], [[k, v] for k, v in shown.items()]))


ARM_LABELS = {"base": "base model", "few_shot": "base + few-shot prompt", "retrieval": "base + retrieved examples",
              "start": "the adapter it trained on from", "variant": "fine-tuned variant"}
ARM_FIGURES = ("loss", "exact_match", "chrf", "format")


def arms_section(evaluations: dict[str, dict], out: Path) -> str:
    """The arms side by side for each evaluated variant (`eval.json` or a winner's eval): a
    table, the verdicts, and a chart of the loss per arm (an eval.json from before the
    retrieval arm shows the arms it has)."""
    if not evaluations:
        return ""
    verdicts = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(e['verdict']['sentence'])}</li>"
                       for name, e in evaluations.items())
    if all(e.get("kind") == "reward_model" for e in evaluations.values()):  # held-out pairs, no arms' losses
        rows = [[name, label, e["arms"][arm]["pair_accuracy"]] for name, e in evaluations.items()
                for arm, label in (("variant", "reward model"), ("longer_answer", "the longer answer wins"))]
        return (f"<h2>Does the reward model order the held-out pairs?</h2><ul>{verdicts}</ul>"
                + table(["variant", "rule", "pair accuracy"], rows))
    rows = [[name, ARM_LABELS[arm], *[e["arms"][arm].get(k) for k in ARM_FIGURES]]
            for name, e in evaluations.items() for arm in ARM_LABELS if arm in e["arms"]]
    plot_arms(evaluations, out / "arms.png")
    return (f"<h2>Does fine-tuning pay?</h2><ul>{verdicts}</ul>"
            + table(["variant", "arm", *ARM_FIGURES], rows) + "<img src='arms.png'>")


def plot_arms(evaluations: dict[str, dict], path: Path) -> None:
    """Loss on the held-out targets per arm, grouped by variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(evaluations)), 4))
    shown = {arm: label for arm, label in ARM_LABELS.items() if any(arm in e["arms"] for e in evaluations.values())}
    width = 0.8 / len(shown)
    for i, (arm, label) in enumerate(shown.items()):
        ax.bar([x + i * width for x in range(len(evaluations))],
               [e["arms"].get(arm, {}).get("loss", float("nan")) for e in evaluations.values()], width, label=label,
               color=f"C{i}")
    ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(evaluations))], list(evaluations), fontsize="small")
    ax.set_ylabel("held-out target loss (lower is better)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return html.escape(f"{value:.4g}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict]], path: Path, base: float | None = None) -> None:
    """Training loss (line) and eval loss (dashed, markers) against the step, one colour per
    run; the base model's eval loss as a grey reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", linewidth=1.5, label=f"base model eval loss {base:.3g}")
    for i, (name, metrics) in enumerate(sorted(curves.items())):
        colour = f"C{i % 10}"
        train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=colour, linestyle="--", marker="o", label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metric_vs_settings(trials: list[dict], keys: list[str], metric: str, winners: set[str], path: Path,
                            base: float | None = None) -> None:
    """One panel per searched setting: each trial's final metric against its value (log axis
    for values spanning more than 10x, labelled at powers of ten only); winners drawn as
    stars; the base model's eval loss as a grey reference line."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    keys = keys or ["(none)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(t["config"].get(key), t["metrics"].get(metric), t["trial"] in winners) for t in trials
                  if isinstance(t["config"].get(key), (int, float)) and t["metrics"].get(metric) is not None]
        for x, y, won in points:
            ax.scatter([x], [y], marker="*" if won else "o", s=140 if won else 40, color="C3" if won else "C0")
        if base is not None:
            ax.axhline(base, color="grey", linestyle=":", linewidth=1.5, label="base model")
            ax.legend(fontsize="small")
        values = [x for x, _, _ in points if x > 0]
        if values and max(values) / min(values) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # matplotlib's minor labels were what overlapped
        ax.tick_params(axis="x", labelsize="small", labelrotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
