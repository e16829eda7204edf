"""Sweeps: the demo sweep (3 trials of the demo job under ASHA, run once for the session by
conftest.demo_sweep) in the local S3 server; a trial that lags at ASHA's first rung is stopped
early; the two best trials are exported with a winner.json whose sha256 sums match the files
and evaluated; every trial has its W&B offline run (grouped by sweep, with its config and
metrics, no secret); the report is drawn. A DPO sweep whose driver is killed finishes with
--resume without re-running finished trials and exports the trial with the best reward accuracy.
Every Train report reaches Tune, the last one too, however soon the run ends after it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft_ray.cli import main
from ft_ray.config import ConfigError, load_config
from ft_ray.report import write_report
from ft_ray.tune import check_search_space
from tests.conftest import DEMO, REPO, SECRET_CANARY, write_job
from tests.faults import kill_processes, kill_session, ray_actor_processes, wait_for
from tests.wandb_offline import read_offline_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = {"max_steps": 8, "eval_every": 2, "checkpoint_every": 4, "warmup_steps": 1, "log_every": 1}


def sweep_job(tmp_path: Path, name: str, storage: dict, space: dict, train: dict | None = None,
              sections: dict | None = None, **tune) -> Path:
    return write_job(tmp_path, f"{name}.yaml", run_name=name, train={**TRAIN, **(train or {})}, storage=storage,
                     distributed={"num_workers": 1},
                     tracking={"wandb": {"mode": "offline", "project": "ft-ray-tests", "dir": str(tmp_path / "wandb")}},
                     tune={"metric": "eval_loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
                           "scheduler": {"type": "asha", "grace_period_steps": 2, "reduction_factor": 2},
                           "search_space": space, **tune}, **(sections or {}))


@pytest.fixture(scope="module")
def sweep(demo_sweep):
    """The demo sweep (conftest.demo_sweep): 3 trials of 60 steps under ASHA, in the local S3
    server, W&B offline, the 2 winners exported and evaluated."""
    return demo_sweep["summary"], demo_sweep["client"], demo_sweep


def s3_bytes(client, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_sweep_runs_every_trial_and_stops_the_laggards_early(sweep):
    summary, client, run = sweep
    trials = summary["trials"]
    assert len(trials) == 3 and all(t["status"] in ("finished", "stopped") for t in trials), trials
    stopped = [t for t in trials if t["stopped_early"]]
    steps = load_config(REPO / "configs" / "sweep-tiny.yaml").train.max_steps
    assert stopped and all(t["status"] == "stopped" and t["step"] < steps for t in stopped), trials
    assert all(t["status"] == "finished" and t["step"] == steps for t in trials if not t["stopped_early"]), trials
    for trial in trials:  # sweep.json says what each trial's own metrics say
        lines = s3_bytes(client, f"{run['uri']}/trials/{trial['trial']}/metrics.jsonl").decode().splitlines()
        evals = [json.loads(line) for line in lines if '"eval_loss"' in line]
        assert (evals[-1]["step"], evals[-1]["eval_loss"]) == (trial["step"], trial["metrics"]["eval_loss"]), trial


def test_winners_are_complete_and_verifiable_in_the_store(sweep):
    summary, client, run = sweep
    assert [w["rank"] for w in summary["winners"]] == [1, 2]
    best = min((t for t in summary["trials"] if t["status"] == "finished"), key=lambda t: t["metrics"]["eval_loss"])
    assert summary["winners"][0]["metrics"]["eval_loss"] == best["metrics"]["eval_loss"]
    for winner in summary["winners"]:
        assert winner["uri"] == f"{run['uri']}/winners/{winner['rank']}-{winner['trial']}"
        manifest = json.loads(s3_bytes(client, f"{winner['uri']}/winner.json"))
        assert manifest["metrics"]["eval_loss"] == winner["metrics"]["eval_loss"]
        assert manifest["source_checkpoint"].startswith(f"{run['uri']}/trials/{winner['trial']}/checkpoint-")
        [trial] = [t for t in summary["trials"] if t["trial"] == winner["trial"]]
        for key, value in trial["config"].items():  # the winner's config holds its trial's searched values
            section, name = key.split(".")
            assert manifest["config"][section][name] == value, key
        assert "weights/adapter_model.safetensors" in manifest["files"]
        for name, entry in manifest["files"].items():
            data = s3_bytes(client, f"{winner['uri']}/{name}")
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), name


def test_every_winner_carries_its_verdict(sweep, tmp_path):
    summary, client, run = sweep
    evaluations = [json.loads(s3_bytes(client, f"{w['uri']}/eval.json")) for w in summary["winners"]]
    for winner, evaluation in zip(summary["winners"], evaluations):
        assert evaluation["examples"] == 24 and evaluation["generated"] == 2
        assert evaluation["variant"] == f"{winner['uri']}/weights"
        manifest = json.loads(s3_bytes(client, f"{winner['uri']}/winner.json"))
        assert manifest["eval"] == winner["eval"]
        assert winner["eval"]["verdict"] == evaluation["verdict"]
        assert set(winner["eval"]["arms"]) == {"base", "few_shot", "retrieval", "variant"}
        assert set(winner["eval"]["comparisons"]) == {"base", "few_shot", "retrieval"}
        # 60 steps at the best settings: the variant is ahead of the base model
        assert winner["eval"]["arms"]["variant"]["loss"] < winner["eval"]["arms"]["base"]["loss"]
    # the base and prompting arms were scored with the first winner only; the second took them
    first, second = evaluations
    assert "other_arms_from" not in first and second["other_arms_from"] == f"{summary['winners'][0]['uri']}/eval.json"
    assert f"the variant (the other arms as in {second['other_arms_from']})" in run["out"]
    assert {a: f for a, f in second["arms"].items() if a != "variant"} == \
        {a: f for a, f in first["arms"].items() if a != "variant"}
    assert second["arms"]["variant"]["loss"] != first["arms"]["variant"]["loss"]
    assert f"verdict: {summary['winners'][0]['eval']['verdict']['sentence']}" in run["out"]
    text = write_report(run["uri"], tmp_path / "report", client.meta.endpoint_url).read_text()
    assert "Does fine-tuning pay?" in text and summary["winners"][0]["eval"]["verdict"]["sentence"] in text
    assert (tmp_path / "report" / "arms.png").read_bytes()[:4] == b"\x89PNG"


def test_every_trial_has_a_wandb_run_in_the_sweep_group_without_secrets(sweep):
    summary, _, run = sweep
    runs = [read_offline_run(f) for f in (run["tmp"] / "wandb").glob("wandb/offline-run-*/run-*.wandb")]
    trial_runs = {r["config"]["run_name"]: r for r in runs if r["job_type"] == "trial"}
    assert sorted(trial_runs) == sorted(t["trial"] for t in summary["trials"])
    for trial in summary["trials"]:
        wandb_run = trial_runs[trial["trial"]]
        assert wandb_run["group"] == "tiny-sweep"
        for key, value in trial["config"].items():  # the searched values, in the trial's own config
            section, name = key.split(".")
            assert wandb_run["config"][section][name] == value, key
        assert any("eval_loss" in h for h in wandb_run["history"]) and any("loss" in h for h in wandb_run["history"])
    assert [r["group"] for r in runs if r["job_type"] == "sweep"] == ["tiny-sweep"]
    for path in (run["tmp"] / "wandb").rglob("*"):
        if path.is_file():
            assert SECRET_CANARY.encode() not in path.read_bytes(), path


def test_report_draws_the_sweep(sweep, tmp_path):
    summary, client, run = sweep
    page = write_report(run["uri"], tmp_path / "report", client.meta.endpoint_url)
    text = page.read_text()
    for trial in summary["trials"]:
        assert trial["trial"] in text
    assert "stopped early" in text and "Winners" in text
    for png in ("loss_curves.png", "metric_vs_settings.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_runs_lists_the_sweep_in_the_store(sweep, capsys):
    """`ft-ray runs s3://...`: the sweep folder is one line (its trials and best one), the
    trial runs inside it are not listed among the runs."""
    summary, client, run = sweep
    assert main(["runs", run["uri"].rsplit("/", 1)[0], "--endpoint-url", client.meta.endpoint_url, "--json"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    best = summary["winners"][0]
    assert (record["name"], record["kind"], record["trials"]) == ("tiny-sweep", "sweep", len(summary["trials"]))
    finished = sum(t["status"] == "finished" for t in summary["trials"])
    assert record["status"] == (f"finished: {finished} of {len(summary['trials'])} trials ran to the end; best "
                                f"eval_loss {best['metrics']['eval_loss']:.4g} ({best['trial']})")


def test_search_space_typos_fail_before_any_trial(tmp_path):
    job = sweep_job(tmp_path, "typo", {"path": str(tmp_path / "runs")},
                    {"lora.rnak": {"choice": [4]}, "train.learning_rate": {"loguniform": [0, 1e-3]}})
    with pytest.raises(ConfigError) as e:
        check_search_space(load_config(job))
    assert e.value.problems == ["tune.search_space.lora.rnak: not a key of the job schema (see ft_ray/config.py)",
                                "tune.search_space.train.learning_rate: loguniform: low must be > 0, got 0"]
    assert not (tmp_path / "runs").exists()


def test_a_killed_dpo_sweep_resumes_without_rerunning_trials_and_ranks_by_reward_accuracy(ray_local, tmp_path):
    # A DPO sweep over a learning rate that learns and one that cannot (each with a beta drawn
    # from two), one trial at a time, ranked by reward accuracy on 16 held-out pairs, on the
    # session's Ray: kill the driver and its trials' processes at once (as a lost driver pod
    # goes; the cluster stays: Ray would end the dead driver's trials itself, about 25 s later
    # here) while the second trial is training past its first checkpoint, the first one
    # finished; `--resume` finishes it and exports the winner. (A driver killed with its own
    # local Ray, a lost head: test_recovery.py.)
    (tmp_path / "eval.jsonl").write_text("\n".join((DEMO / "preference-eval.jsonl").read_text().splitlines()[:16]) + "\n")
    space = {"train.learning_rate": {"grid": [1e-3, 1e-9]}, "preference.beta": {"choice": [0.1, 0.5]}}
    job = sweep_job(tmp_path, "resumed", {"path": str(tmp_path / "runs")}, space, max_concurrent_trials=1,
                    scheduler={"type": "fifo"}, metric="eval_reward_accuracy", mode="max", export_top_k=1,
                    train={"micro_batch_size": 2, "learning_rate": 1e-3},
                    sections={"objective": "dpo", "model": {"max_seq_len": 512}, "lora": {"rank": 16, "alpha": 32},
                              "data": {"train": str(DEMO / "preference-train.jsonl"),
                                       "eval": str(tmp_path / "eval.jsonl")},
                              "preference": {"reference": "inline"}})  # no reference pass per trial (12 s)
    trials = tmp_path / "runs" / "resumed" / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    actors = ("run_trial", "TrainController", "RayTrainWorker")
    earlier = {p.pid for p in ray_actor_processes(*actors)}  # not this sweep's (none: a finished run's go)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "ft_ray", "tune", str(job)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(lambda: len(list(trials.glob("*/summary.json"))) == 1
                     and len(list(trials.glob("*/checkpoint-000004/manifest.json"))) == 2, 600,
                     "one trial finished and the other past its first checkpoint", first)
        finally:
            kill_session(first)
            kill_processes([p for p in ray_actor_processes(*actors) if p.pid not in earlier])
    wait_for(lambda: all(p.pid in earlier for p in ray_actor_processes(*actors)), 60, "the trials' processes gone")
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

    [winner] = summary["winners"]  # ranked by reward accuracy: the rate that learns
    best = max(summary["trials"], key=lambda t: t["metrics"]["eval_reward_accuracy"])
    assert winner["trial"] == best["trial"] and best["config"]["train.learning_rate"] == 1e-3
    assert winner["metrics"]["eval_reward_accuracy"] >= 0.9
    folder = tmp_path / "runs" / "resumed" / "winners" / f"1-{winner['trial']}"
    manifest = json.loads((folder / "winner.json").read_text())
    assert manifest["config"]["objective"] == "dpo"
    assert manifest["config"]["preference"]["beta"] == best["config"]["preference.beta"]
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), name


def test_a_run_trains_on_from_a_winner_in_the_store(sweep, tmp_path):
    """model.adapter: a winner's s3:// URI (its files checked against winner.json, read with the
    storage section's endpoint): the job's LoRA settings are the winner's, each of the 2 workers
    loads it from the store, and training starts where the winner is (the eval loss at step 0
    is its checkpoint's); generate --compare answers with it as the start adapter too."""
    import yaml

    from ft_ray.generate import Answerer, Settings
    from ft_ray.models import with_adapter, with_start_adapter
    from ft_ray.train.trainer import run_training
    from tests.conftest import tiny_job
    from tests.faults import DATA

    summary, client, run = sweep
    winner = summary["winners"][0]
    endpoint = run["overrides"][1].split("=", 1)[1]
    job = tiny_job(tmp_path, run_name="from-winner", model={"max_seq_len": 256, "adapter": winner["uri"]},
                   data=DATA, train={"max_steps": 1}, storage={"path": str(tmp_path / "runs"), "endpoint_url": endpoint})
    job["lora"] = {"dropout": 0.0}  # the rest is the winner's
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    config = with_adapter(load_config(tmp_path / "job.yaml"))
    assert config.model.adapter == f"{winner['uri']}/weights"
    manifest = json.loads(s3_bytes(client, f"{winner['uri']}/winner.json"))
    assert (config.lora.rank, config.lora.alpha) == (manifest["config"]["lora"]["rank"],
                                                     manifest["config"]["lora"]["alpha"])

    trained = run_training(config)
    checkpoint_step = int(manifest["source_checkpoint"][-6:])
    trial = [json.loads(line) for line in s3_bytes(client, f"{run['uri']}/trials/{winner['trial']}/metrics.jsonl")
             .decode().splitlines()]
    [where_it_was] = [m["eval_loss"] for m in trial if m.get("step") == checkpoint_step and "eval_loss" in m]
    assert trained["eval_loss_initial"] == pytest.approx(where_it_was, rel=1e-4)
    saved = json.loads((tmp_path / "runs" / "from-winner" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == config.lora.rank

    answerer = Answerer(with_start_adapter(config), tmp_path / "runs" / "from-winner" / "adapter",
                        Settings(max_new_tokens=6, compare=True))
    assert set(answerer.answer("### Instruction:\nReply to Ben.\n\n### Response:\n")) == {"variant", "start", "base"}


def test_a_changed_winner_is_neither_evaluated_nor_trained_on(sweep):
    from ft_ray.config import InputError
    from ft_ray.evaluation.evaluate import resolve_target
    from ft_ray.models import adapter_folder

    summary, client, run = sweep
    winner = summary["winners"][1]["uri"]
    copy = f"changed/{winner.rsplit('/', 1)[1]}"  # a copy with its weights changed: the winner stays intact
    for name in [*json.loads(s3_bytes(client, f"{winner}/winner.json"))["files"], "winner.json"]:
        data = bytearray(s3_bytes(client, f"{winner}/{name}"))
        if name == "weights/adapter_model.safetensors":
            data[-1] ^= 0xFF
        client.put_object(Bucket="demo-sweeps", Key=f"{copy}/{name}", Body=bytes(data))
    config = load_config(REPO / "configs" / "sweep-tiny.yaml", run["overrides"])
    with pytest.raises(InputError, match=r"weights/adapter_model.safetensors has sha256 .*not evaluated"):
        with resolve_target(f"s3://demo-sweeps/{copy}", config):
            pass
    with pytest.raises(InputError, match=rf"model.adapter: s3://demo-sweeps/{copy}: weights/adapter_model.safetensors "
                                         "has sha256 .*incomplete or changed"):
        adapter_folder(f"s3://demo-sweeps/{copy}", config.storage)


def test_every_train_report_reaches_tune_even_one_just_before_the_run_ends(ray_local, tmp_path):
    """Each trial's Train run reports 4 times, the last just before it returns (Ray's own
    TuneReportCallback hangs there, or drops it, when the trial's end result comes first);
    a run that fails fails its trial with its error after its reports."""
    from ray import tune as ray_tune

    from ft_ray.tune import TrainReports, report_to_tune

    def trainable(config):
        reports = TrainReports()

        def train():  # the Train controller's side: after_report for each of rank 0's reports
            for step in range(4):
                reports.after_report(None, [{"step": step, "x": config["x"]}], None)
            if config["x"] == 1:
                raise RuntimeError("the run failed at step 3")

        report_to_tune(train, reports, ray_tune.report)

    tuner = ray_tune.Tuner(trainable, param_space={"x": ray_tune.grid_search([0, 1])},
                           tune_config=ray_tune.TuneConfig(max_concurrent_trials=2),
                           run_config=ray_tune.RunConfig(storage_path=str(tmp_path), name="reports"))
    results = sorted(tuner.fit(), key=lambda result: result.metrics["x"])
    assert [(r.metrics["x"], r.metrics["step"], r.metrics["training_iteration"]) for r in results] == \
        [(0, 3, 4), (1, 3, 4)]
    assert [r.error is not None for r in results] == [False, True]
    assert "the run failed at step 3" in str(results[-1].error)
