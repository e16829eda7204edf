"""Sweeps: 4 trials (2 at once) of the tiny job under ASHA, on the local S3 server; a learning
rate that cannot learn anything in a few steps is stopped early; the two best trials are
exported with a winner.json whose sha256 sums match the files; every trial has its W&B
offline run (grouped by sweep, with its config and metrics, no secret); the report is drawn.
A sweep whose driver is killed finishes with --resume without re-running finished trials."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft_ray.config import ConfigError, load_config
from ft_ray.report import write_report
from ft_ray.tune import check_search_space, run_sweep
from tests.conftest import SECRET_CANARY, make_bucket, write_job
from tests.faults import kill_session, wait_for
from tests.wandb_offline import read_offline_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD, USELESS = 3e-3, 1e-9
TRAIN = {"max_steps": 8, "eval_every": 2, "checkpoint_every": 4, "warmup_steps": 1, "log_every": 1}


def sweep_job(tmp_path: Path, name: str, storage: dict, space: dict, **tune) -> Path:
    return write_job(tmp_path, f"{name}.yaml", run_name=name, train=TRAIN, storage=storage,
                     distributed={"num_workers": 1},
                     tracking={"wandb": {"mode": "offline", "project": "ft-ray-tests", "dir": str(tmp_path / "wandb")}},
                     tune={"metric": "eval_loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
                           "scheduler": {"type": "asha", "grace_period_steps": 2, "reduction_factor": 2},
                           "search_space": space, **tune})


@pytest.fixture(scope="module")
def sweep(ray_local, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    client = make_bucket(s3_server, "sweeps")
    # Grid order puts the useful rates first: by the time the useless ones reach ASHA's first
    # rung (step 2), two results are recorded there to compare with. The two useful trials are
    # alike, so the second is never below the first's cut at the rung.
    space = {"train.learning_rate": {"grid": [GOOD, GOOD, USELESS, USELESS]}, "lora.alpha": {"grid": [8]}}
    job = sweep_job(tmp, "lr-sweep", {"path": "s3://sweeps/runs", "endpoint_url": s3_server}, space, export_top_k=2)
    # every winner is then evaluated: its weights come from the store to the model actors
    summary = run_sweep(load_config(job, ["eval.after_training=true", "eval.num_generations=2",
                                          "eval.max_new_tokens=16", "eval.max_examples=24"]))
    return summary, client, tmp


def s3_bytes(client, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_sweep_runs_every_trial_and_stops_the_useless_ones_early(sweep):
    summary, client, _ = sweep
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["status"] in ("finished", "stopped") for t in trials), trials
    useless = [t for t in trials if t["config"]["train.learning_rate"] == USELESS]
    assert any(t["stopped_early"] and t["step"] < TRAIN["max_steps"] for t in useless), trials
    assert all(t["status"] == "finished" and t["step"] == 8 for t in trials
               if t["config"]["train.learning_rate"] != USELESS)
    stored = json.loads(s3_bytes(client, "s3://sweeps/runs/lr-sweep/sweep.json"))
    assert stored["trials"] == trials


def test_winners_are_complete_and_verifiable_in_the_store(sweep):
    summary, client, _ = sweep
    assert [w["rank"] for w in summary["winners"]] == [1, 2]
    best = min((t for t in summary["trials"] if t["status"] == "finished"), key=lambda t: t["metrics"]["eval_loss"])
    assert summary["winners"][0]["metrics"]["eval_loss"] == best["metrics"]["eval_loss"]
    for winner in summary["winners"]:
        assert winner["uri"] == f"s3://sweeps/runs/lr-sweep/winners/{winner['rank']}-{winner['trial']}"
        manifest = json.loads(s3_bytes(client, f"{winner['uri']}/winner.json"))
        assert manifest["metrics"]["eval_loss"] == winner["metrics"]["eval_loss"]
        assert manifest["source_checkpoint"].startswith(f"s3://sweeps/runs/lr-sweep/trials/{winner['trial']}/checkpoint-")
        assert manifest["config"]["train"]["learning_rate"] != USELESS
        assert "weights/adapter_model.safetensors" in manifest["files"]
        for name, entry in manifest["files"].items():
            data = s3_bytes(client, f"{winner['uri']}/{name}")
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), name


def test_every_winner_carries_its_verdict(sweep, tmp_path):
    summary, client, _ = sweep
    stored = json.loads(s3_bytes(client, "s3://sweeps/runs/lr-sweep/sweep.json"))
    assert stored["winners"] == summary["winners"]
    for winner in summary["winners"]:
        evaluation = json.loads(s3_bytes(client, f"{winner['uri']}/eval.json"))
        assert evaluation["examples"] == 24 and evaluation["generated"] == 2
        assert evaluation["variant"] == f"{winner['uri']}/weights"
        manifest = json.loads(s3_bytes(client, f"{winner['uri']}/winner.json"))
        assert manifest["eval"] == winner["eval"]
        assert winner["eval"]["verdict"] == evaluation["verdict"]
        assert set(winner["eval"]["arms"]) == {"base", "few_shot", "retrieval", "variant"}
        assert set(winner["eval"]["comparisons"]) == {"base", "few_shot", "retrieval"}
        # 8 steps at a learning rate that learns: the variant is ahead of the base model
        assert winner["eval"]["arms"]["variant"]["loss"] < winner["eval"]["arms"]["base"]["loss"]
    text = write_report("s3://sweeps/runs/lr-sweep", tmp_path / "report", client.meta.endpoint_url).read_text()
    assert "Does fine-tuning pay?" in text and summary["winners"][0]["eval"]["verdict"]["sentence"] in text
    assert (tmp_path / "report" / "arms.png").read_bytes()[:4] == b"\x89PNG"


def test_every_trial_has_a_wandb_run_in_the_sweep_group_without_secrets(sweep):
    summary, _, tmp = sweep
    runs = [read_offline_run(f) for f in (tmp / "wandb").glob("wandb/offline-run-*/run-*.wandb")]
    trial_runs = {r["config"]["run_name"]: r for r in runs if r["job_type"] == "trial"}
    assert sorted(trial_runs) == sorted(t["trial"] for t in summary["trials"])
    for trial in summary["trials"]:
        run = trial_runs[trial["trial"]]
        assert run["group"] == "lr-sweep"
        for key, value in trial["config"].items():  # the searched values, in the trial's own config
            section, name = key.split(".")
            assert run["config"][section][name] == value, key
        assert any("eval_loss" in h for h in run["history"]) and any("loss" in h for h in run["history"])
    assert [r["group"] for r in runs if r["job_type"] == "sweep"] == ["lr-sweep"]
    for path in (tmp / "wandb").rglob("*"):
        if path.is_file():
            assert SECRET_CANARY.encode() not in path.read_bytes(), path


def test_report_draws_the_sweep(sweep, tmp_path):
    summary, client, _ = sweep
    page = write_report("s3://sweeps/runs/lr-sweep", tmp_path / "report", client.meta.endpoint_url)
    text = page.read_text()
    for trial in summary["trials"]:
        assert trial["trial"] in text
    assert "stopped early" in text and "Winners" in text
    for png in ("loss_curves.png", "metric_vs_settings.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_search_space_typos_fail_before_any_trial(tmp_path):
    job = sweep_job(tmp_path, "typo", {"path": str(tmp_path / "runs")},
                    {"lora.rnak": {"choice": [4]}, "train.learning_rate": {"loguniform": [0, 1e-3]}})
    with pytest.raises(ConfigError) as e:
        check_search_space(load_config(job))
    assert e.value.problems == ["tune.search_space.lora.rnak: not a key of the job schema (see ft_ray/config.py)",
                                "tune.search_space.train.learning_rate: loguniform: low must be > 0, got 0"]
    assert not (tmp_path / "runs").exists()


def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_local, tmp_path):
    # One trial at a time: kill the driver (and its local Ray) while the second trial is
    # training past its first checkpoint, the first one finished.
    space = {"train.learning_rate": {"grid": [GOOD, 2e-3]}}
    job = sweep_job(tmp_path, "resumed", {"path": str(tmp_path / "runs")}, space,
                    max_concurrent_trials=1, scheduler={"type": "fifo"})
    trials = tmp_path / "runs" / "resumed" / "trials"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "ft_ray", "tune", str(job)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: len(list(trials.glob("*/summary.json"))) == 1
                     and len(list(trials.glob("*/checkpoint-000004/manifest.json"))) == 2, 600,
                     "one trial finished and the other past its first checkpoint", first)
        finally:
            kill_session(first)
    [finished] = [p.parent for p in trials.glob("*/summary.json")]
    finished_metrics = (finished / "metrics.jsonl").read_text()

    second = subprocess.run([sys.executable, "-m", "ft_ray", "tune", str(job), "--resume"], capture_output=True,
                            text=True, env=env, timeout=900)
    (tmp_path / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "resumed" / "sweep.json").read_text())
    assert sorted(t["status"] for t in summary["trials"]) == ["finished", "finished"]
    assert all(t["step"] == 8 for t in summary["trials"])
    assert (finished / "metrics.jsonl").read_text() == finished_metrics, "the finished trial ran again"
    [other] = [p for p in trials.iterdir() if p != finished]
    resumed = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines() if "resumed_from" in line]
    assert resumed and resumed[0]["step"] >= 4, "the unfinished trial started over instead of resuming"
    assert [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line] == list(range(1, 9))


def test_a_changed_winner_is_not_evaluated(sweep):
    # Last in this file: it damages the second winner in the store.
    from ft_ray.config import InputError
    from ft_ray.evaluation.evaluate import resolve_target

    summary, client, tmp = sweep
    winner = summary["winners"][1]["uri"]
    bucket, key = f"{winner}/weights/adapter_model.safetensors"[len("s3://"):].split("/", 1)
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    config = load_config(tmp / "lr-sweep.yaml")
    with pytest.raises(InputError, match=r"weights/adapter_model.safetensors has sha256 .*not evaluated"):
        resolve_target(winner, config)
