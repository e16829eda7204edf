"""The embedded default (`make demo`) end to end, as a user runs it with its output piped to
a file: exact output files, a golden initial eval loss, the promised improvement (eval loss
at least 30% lower), the closing comparison with the base model and few-shot prompting of
it, and a readable transcript (ft-ray's lines only; Ray's in the run's log)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ft_ray.config import load_config
from ft_ray.evaluation.evaluate import resolve_target
from ft_ray.report import write_report
from tests.conftest import REPO, piped

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The base model and the eval set are fixed, so the loss before training is too (the eval set without
# the 3 records that were training records too: 5.1489 with them).
GOLDEN_INITIAL_EVAL_LOSS = 5.1435


def assert_plain(out: str) -> None:
    assert not re.search(r"\x1b|\r", out), "escape codes or carriage returns in piped output"
    assert not any("Dataset" in line or "(pid=" in line or "RayTrainWorker" in line for line in out.splitlines()), out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """`ft-ray train configs/tiny-cpu.yaml` (make demo), piped to a file: (its run folder, its output)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    code, out = piped(tmp_path, "train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"storage.path={tmp_path}")
    assert code == 0, out
    return tmp_path / "tiny-cpu", out


def test_demo_config_fine_tunes_the_house_style(demo, ray_local):
    run, out = demo
    tmp_path = run.parent
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "data_files.json", "metrics.jsonl", "summary.json", "eval.json", "adapter", "base_model",
        "checkpoint-000100", "checkpoint_manager_snapshot.json", "logs"}
    assert {p.name for p in (run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                             "tokenizer.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 100
    assert summary["eval_loss_initial"] == pytest.approx(GOLDEN_INITIAL_EVAL_LOSS, abs=2e-3)
    assert summary["eval_loss_final"] <= 0.7 * summary["eval_loss_initial"]
    assert f"summary: {run}/summary.json" in out
    assert f"eval loss {summary['eval_loss_initial']:.4f} before" in out
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["examples"] == 48 and evaluation["generated"] == 8
    arms = evaluation["arms"]
    assert arms["base"]["loss"] == pytest.approx(GOLDEN_INITIAL_EVAL_LOSS, abs=2e-3)  # same targets as training's eval
    assert evaluation["verdict"]["outcome"] == "variant_better" and evaluation["vs_base"]["outcome"] == "variant_better"
    assert arms["variant"]["loss"] < arms["few_shot"]["loss"] and arms["variant"]["loss"] < arms["base"]["loss"]
    # the prompting arms get the base model's context: 3 examples fit before every prompt
    assert arms["few_shot"]["shots_mean"] == arms["retrieval"]["shots_mean"] == 3
    assert evaluation["verdict"]["strongest_prompting_arm"] in ("few_shot", "retrieval")
    assert arms["variant"]["tokens_per_request"] < arms["retrieval"]["tokens_per_request"]
    assert arms["variant"]["format"] >= 0.75 and arms["base"]["format"] == 0.0  # the house style is learned
    assert arms["variant"]["chrf"] > arms["base"]["chrf"]
    # the answers kept: the variant's in the house style (all but one at most, as format allows), no base one
    house = [s["variant"].startswith("Hi ") and "Northwind team" in s["variant"] for s in evaluation["samples"]]
    assert len(house) == 5 and sum(house) >= 4, evaluation["samples"]
    assert not any("Northwind team" in s["base"] for s in evaluation["samples"])
    assert f"verdict: {evaluation['verdict']['sentence']}" in out

    # the transcript: ft-ray's own lines, short, plain; Ray's output in the run's log
    lines = out.splitlines()
    # progress lines come every 10% and every 30 s: how many depends on the machine's load
    progress = [line for line in lines if re.search(r" \d+/\d+ (steps|examples)  ", line)]
    assert len(lines) - len(progress) <= 50 and len(progress) <= 25, out
    assert_plain(out)
    assert "[ft-ray]   packed train sequences  200" in lines  # the data table
    # 200 sequences on 2 workers, 4 a batch: 25 steps an epoch
    assert re.search(r"^\[ft-ray\] train: 100/100 steps  epoch 4.00  loss [\d.]+  eval loss [\d.]+ \(step 100\)",
                     out, re.M)
    assert re.search(r"before → [\d.]+ after \(\d+% lower\), 100 steps \(4.00 epochs\), ", out)
    [log] = (run / "logs").glob("train-*.log")
    assert lines[0].startswith(f"[ft-ray] log: {log}")
    ray_lines = log.read_text()
    assert "RayTrainWorker" in ray_lines and "Dataset" in ray_lines  # Ray's own output is kept, there

    # `ft-ray eval --run` takes the run folder (its exported adapter) or a checkpoint (exported
    # into the run while it is evaluated, where every node reads it; removed after)
    config = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"storage.path={tmp_path}"])
    with resolve_target(str(run), config) as target:
        assert target.weights == str(run / "adapter")
    before = sorted(run.iterdir())
    with resolve_target(str(run / "checkpoint-000100"), config) as target:
        assert target.folder.root == str(run) and target.train_examples == summary["data"]["train_examples"]
        assert Path(target.weights).parent.parent == run and target.origin == str(run / "checkpoint-000100")
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(target.weights).iterdir()}
    assert sorted(run.iterdir()) == before


def test_the_demo_sweep_beats_the_untuned_demo(demo, demo_sweep, tmp_path):
    """`make demo-sweep` (conftest.demo_sweep; its W&B runs, store and winners: test_tune.py):
    the seeded search samples a learning rate too low to learn (stopped at ASHA's first rung)
    and better settings than the demo's; its winner, in 60 steps, beats the demo run's 100."""
    untuned = json.loads((demo[0] / "summary.json").read_text())["eval_loss_final"]
    summary, out = demo_sweep["summary"], demo_sweep["out"]
    assert_plain(out)
    assert summary["winners"][0]["metrics"]["eval_loss"] < untuned, (summary, untuned)
    assert any(t["stopped_early"] for t in summary["trials"])
    for trial in summary["trials"]:  # one line when it starts (its values), one when it ends
        name = trial["trial"].removeprefix("tiny-sweep-")
        assert re.search(rf"^\[ft-ray\] trial {name} started: alpha=\d+ rank=\d+ learning_rate=[\d.e-]+$", out, re.M)
        end = f"stopped by the scheduler at step {trial['step']}" if trial["stopped_early"] else "finished at step 60"
        assert f"[ft-ray] trial {name} {end}: eval_loss {trial['metrics']['eval_loss']:.4g}" in out
    page = write_report(demo_sweep["uri"], tmp_path / "report", demo_sweep["client"].meta.endpoint_url).read_text()
    assert f"<td>winners/1-{summary['winners'][0]['trial']}</td>" in page  # relative to the sweep folder
    assert f"{demo_sweep['uri']}/winners" not in page


@pytest.fixture(scope="module")
def demo_teacher(demo, tmp_path_factory) -> Path:
    """The demo's variant merged into its base (`ft-ray export --merge`): a teacher."""
    from ft_ray.cli import main

    folder = tmp_path_factory.mktemp("teacher") / "merged"
    assert main(["export", str(demo[0]), "--merge", "--out", str(folder)]) == 0
    return folder


def test_the_demo_variant_teaches_the_base_model_its_house_style_by_distillation(demo, demo_teacher, ray_local,
                                                                                     tmp_path, capsys):
    """The demo's variant, merged (`ft-ray export --merge`), is the teacher of the base model
    (objective distill) with distill.ratio 1: the loss is the divergence alone, the records'
    answers only say where to compare; and with distill.on_policy 0.5, about half the steps
    the model answers the prompts itself (on both workers at once) and the teacher grades its
    answers. The base model learns the house style from the teacher's distributions: its
    held-out divergence from the teacher falls, and so does its next-token loss on the
    answers, which it never trains on. `ft-ray eval` sets the student against its teacher
    too, and says how far from the base model toward it it went."""
    from ft_ray.cli import main
    from ft_ray.train.trainer import run_training
    from tests.conftest import write_job

    run, _ = demo
    job = write_job(tmp_path, run_name="distill", objective="distill", model={"max_seq_len": 256},
                    lora={"rank": 8, "alpha": 16},
                    distill={"teacher": str(demo_teacher), "ratio": 1.0, "temperature": 2.0, "on_policy": 0.5,
                             "max_new_tokens": 32},
                    train={"max_steps": 12, "eval_every": 12, "checkpoint_every": 12, "warmup_steps": 2})
    summary = run_training(load_config(job))
    lines = [json.loads(line) for line in (tmp_path / "runs" / "distill" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_loss" in line]
    assert summary["objective"] == "distill" and [e["step"] for e in evals] == [0, 12]
    # each step's answers are the model's on both workers, or the records' on both (7 of the 12 here)
    shares = [line["on_policy"] for line in lines if "loss" in line]
    assert set(shares) == {0.0, 1.0} and 3 <= sum(shares) <= 9
    assert summary["eval_divergence_initial"] == evals[0]["eval_divergence"] == pytest.approx(evals[0]["eval_loss"])
    # 12 steps: 4.77 -> 3.42 and 5.14 -> 3.89 here (the teacher, 100 steps of the demo, is at 0.51)
    assert summary["eval_divergence_final"] < 0.9 * summary["eval_divergence_initial"]
    assert evals[-1]["eval_next_token_loss"] < 0.9 * evals[0]["eval_next_token_loss"]

    capsys.readouterr()
    assert main(["eval", str(job), "--run", str(tmp_path / "runs" / "distill"), "--set", "eval.num_generations=2",
                 "--set", "eval.max_new_tokens=16"]) == 0
    out = capsys.readouterr().out
    evaluation = json.loads((tmp_path / "runs" / "distill" / "eval.json").read_text())
    arms, teacher = evaluation["arms"], evaluation["comparisons"]["teacher"]
    # the teacher arm runs the demo's variant, merged: its held-out loss is the demo's variant arm's
    demo_variant = json.loads((run / "eval.json").read_text())["arms"]["variant"]
    assert arms["teacher"]["loss"] == pytest.approx(demo_variant["loss"], abs=1e-3)
    assert arms["teacher"]["loss"] < arms["variant"]["loss"] < arms["base"]["loss"]
    assert teacher["outcome"] == "other_better" and 0.1 < evaluation["teacher_gap_closed"] < 0.9
    assert re.search(r"^\[ft-ray\]   teacher +[\d.]+ ", out, re.M), out
    assert (f"vs the teacher: the teacher beats the variant: loss {arms['variant']['loss']:.3g} vs "
            f"{arms['teacher']['loss']:.3g}") in out
    assert f"(the variant went {evaluation['teacher_gap_closed']:.0%} of the way from the base model to it)" in out


def test_a_teacher_run_once_before_training_teaches_from_its_top_logits(demo_teacher, ray_local, tmp_path, capfd):
    """distill.teacher_logits: precomputed: `ft-ray prepare` runs the teacher once over the
    packed data (model actors) and stores its 16 likeliest tokens and their logits at each
    trained token with it; the run reads them from the prepared data (no teacher pass again)
    and the base model learns the house style from them: its held-out divergence from the
    teacher and its next-token loss on the answers fall."""
    from ft_ray.cli import main
    from ft_ray.train.trainer import run_training
    from tests.conftest import write_job

    job = write_job(tmp_path, run_name="distill", objective="distill", model={"max_seq_len": 256},
                    lora={"rank": 8, "alpha": 16},
                    distill={"teacher": str(demo_teacher), "ratio": 1.0, "temperature": 2.0,
                             "teacher_logits": "precomputed", "top_k": 16},
                    train={"max_steps": 8, "eval_every": 8, "checkpoint_every": 8, "warmup_steps": 2})
    assert main(["prepare", str(job)]) == 0
    assert re.search(rf"teacher: top-16 logits of {demo_teacher} at every trained token of \d+ sequences, on 2 model "
                     r"actor\(s\)", capfd.readouterr().out)
    summary = run_training(load_config(job))
    out = capfd.readouterr().out
    assert "data: using prepared data at" in out and "teacher: top-16" not in out
    # 8 steps: 10.43 -> 9.03 and 5.14 -> 4.20 here (over the teacher's 16 likeliest tokens, renormalized, at
    # temperature 2 the divergence is larger than over the whole distribution)
    assert summary["eval_divergence_final"] < 0.95 * summary["eval_divergence_initial"]
    assert summary["eval_next_token_loss_final"] < 0.9 * summary["eval_next_token_loss_initial"]
