"""The driver's decisions made before Ray starts: how many optimizer steps a run has,
whether a relaunch resumes over the data it began with, whether another driver trains it."""

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from ft_ray.config import InputError, StorageConfig, config_from_dict, dump_yaml
from ft_ray.data.sources import DataError
from ft_ray.storage import RunFolder
from ft_ray.train.trainer import (DATA_FILES, DRIVER_LOCK, check_same_data, check_same_job, finished_run, holding,
                                  plan_steps)


def test_steps_are_planned_from_packed_sequences_and_the_most_workers():
    config = config_from_dict({"data": {"train": "x.jsonl"}, "distributed": {"num_workers": [1, 4]},
                               "train": {"micro_batch_size": 2, "gradient_accumulation": 2, "epochs": 3}})
    plan = plan_steps(config, train_sequences=40)  # 10 per worker -> 5 micro batches per epoch
    assert plan.batches_per_epoch == 5 and plan.total_steps == 3 * 5 // 2
    config.train.max_steps = 7
    assert plan_steps(config, 40).total_steps == 7
    with pytest.raises(DataError, match="only 3 packed training sequences for 4 workers: add data or lower "
                                        "distributed.num_workers"):
        plan_steps(config, 3)


def test_a_relaunch_over_changed_data_files_says_so_and_records_them(tmp_path, caplog):
    run = RunFolder.at(str(tmp_path / "run"), StorageConfig())
    began = [{"source": {}, "files": [("/d/a.jsonl", 100, "t1"), ("/d/b.jsonl", 50, "t1")]}]
    check_same_data(run, began, resumes=False)
    check_same_data(run, began, resumes=True)  # the same files: nothing to say
    later = [{"source": {}, "files": [("/d/a.jsonl", 120, "t2"), ("/d/c.jsonl", 5, "t2")]}]
    with caplog.at_level(logging.WARNING, logger="ft_ray"):
        check_same_data(run, later, resumes=True)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning == (f"the data files changed since {run.uri} last ran: 1 changed, 1 added, 1 removed "
                       "(/d/a.jsonl: 100 -> 120 bytes, modified t2). It resumes at its step over the new data, whose "
                       "sequences and order differ from those it began with; --force-new starts over on them")
    assert json.loads((tmp_path / "run" / DATA_FILES).read_text()) == {"/d/a.jsonl": [120, "t2"], "/d/c.jsonl": [5, "t2"]}


HOLD = """
import sys, time
from ft_ray.config import StorageConfig
from ft_ray.storage import RunFolder
from ft_ray.train.trainer import holding
with holding(RunFolder.at(sys.argv[1], StorageConfig())):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_driver_of_a_run_is_refused_and_a_killed_ones_hold_goes_with_it(tmp_path):
    run = RunFolder.at(str(tmp_path / "run"), StorageConfig())
    first = subprocess.Popen([sys.executable, "-c", HOLD, run.root], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        with pytest.raises(InputError, match=rf"^{run.uri} is being trained by another driver \(pid {first.pid} on "
                                             r".+ since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\): wait for it to end"):
            with holding(run):
                pass
        (tmp_path / "run" / "checkpoint-000002").mkdir()
        job = config_from_dict({"data": {"train": "x.jsonl"}})
        with pytest.raises(InputError, match="is being trained by another driver"):  # --force-new moves nothing
            check_same_job(job, run, force_new=True)
        assert (tmp_path / "run" / "checkpoint-000002").is_dir()
    finally:
        first.kill()
        first.wait()
    with holding(run):  # the OS released the killed driver's lock: its relaunch goes on
        pass


LEASE_HOLD = """
import sys, time
import ft_ray.lease
from ft_ray.config import StorageConfig
from ft_ray.storage import RunFolder
from ft_ray.train.trainer import holding
ft_ray.lease.RENEW_S = 0.2
with holding(RunFolder.at(sys.argv[1], StorageConfig(endpoint_url=sys.argv[2]))):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_run_in_object_storage_is_held_by_a_lease_that_a_killed_drivers_relaunch_takes_over(
        s3_server, monkeypatch, capsys):
    """S3 has no locks: the driver writes a lease object (a conditional write) and renews it.
    A second driver sees it renewed and is refused, `ft-ray runs` names the holder; a killed
    driver's lease is not renewed, and its relaunch takes it over once it lapses."""
    import ft_ray.lease
    from ft_ray.runs import _holder
    from tests.conftest import make_bucket

    monkeypatch.setattr(ft_ray.lease, "LEASE_TTL_S", 2.0)
    monkeypatch.setattr(ft_ray.lease, "POLL_S", 0.1)
    client = make_bucket(s3_server, "leases")
    run = RunFolder.at("s3://leases/runs/r", StorageConfig(endpoint_url=s3_server))
    first = subprocess.Popen([sys.executable, "-c", LEASE_HOLD, run.uri, s3_server], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        assert _holder(run).startswith(f"pid {first.pid} on ")
        with pytest.raises(InputError, match=rf"^s3://leases/runs/r is being trained by another driver \(pid "
                                             rf"{first.pid} on .+ UTC\): wait for it to end"):
            with holding(run):
                pass
    finally:
        first.kill()
        first.wait()
    with holding(run):  # the killed driver's lease lapses: its relaunch goes on
        assert _holder(run).startswith(f"pid {os.getpid()} on ")
    assert "took over the lease of pid" in capsys.readouterr().out
    assert "Contents" not in client.list_objects_v2(Bucket="leases", Prefix="runs/r/")  # released: removed
    assert _holder(run) is None
    with holding(run, trial=True):  # a sweep's trial: the sweep's driver holds the sweep
        assert "Contents" not in client.list_objects_v2(Bucket="leases", Prefix="runs/r/")
    # --force-new moves the folder aside under the lease, and leaves no copy of it there
    client.put_object(Bucket="leases", Key="runs/r/checkpoint-000002/trainer_state.json", Body=b"{}")
    job = config_from_dict({"run_name": "r", "data": {"train": "x.jsonl"},
                            "storage": {"path": "s3://leases/runs", "endpoint_url": s3_server}})
    assert check_same_job(job, RunFolder.for_job(job), force_new=True) is None
    moved = [o["Key"] for o in client.list_objects_v2(Bucket="leases", Prefix="runs/r.replaced-")["Contents"]]
    assert [key.split("/", 2)[2] for key in moved if not key.endswith("/")] == ["checkpoint-000002/trainer_state.json"]


@pytest.mark.parametrize("store", ["ignores", "refuses"])
def test_a_store_without_conditional_writes_leaves_the_run_unlocked_and_says_so(s3_server, capsys, store):
    """A store that ignores If-None-Match / If-Match (it writes over the lease), or refuses them
    (501 NotImplemented): the run goes on unlocked, a warning says why, and no lease is left."""
    import boto3
    from botocore.awsrequest import AWSResponse

    from ft_ray.lease import Lease
    from tests.conftest import make_bucket

    make_bucket(s3_server, f"lease-{store}")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def without_conditions(request, **_):
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    class Body:
        def stream(self):
            return [b"<Error><Code>NotImplemented</Code><Message>conditional writes</Message></Error>"]

    def not_implemented(request, **_):
        if "If-None-Match" in request.headers or "If-Match" in request.headers:
            return AWSResponse(request.url, 501, {}, Body())

    if store == "ignores":
        client.meta.events.register("before-sign.s3.PutObject", without_conditions)
    else:
        client.meta.events.register("before-send.s3.PutObject", not_implemented)
    for _ in range(2):  # a second driver is not refused
        lease = Lease(client, f"lease-{store}", "runs/r/.driver.lock", f"s3://lease-{store}/runs/r")
        lease.acquire()
        lease.release()
        assert "Contents" not in client.list_objects_v2(Bucket=f"lease-{store}", Prefix="runs/r/")
    said = capsys.readouterr().out
    assert said.count("this run is not locked, so a second driver of it would not be refused") == 2
    assert ("the store ignores conditional writes" if store == "ignores"
            else "does not take conditional writes (NotImplemented)") in said


def test_a_driver_starting_while_ft_ray_runs_looks_at_the_lock_is_not_refused(tmp_path):
    import fcntl
    import threading

    run = RunFolder.at(str(tmp_path / "run"), StorageConfig())
    with holding(run):
        pass
    with open(tmp_path / "run" / DRIVER_LOCK) as probe:  # what runs._holder takes for an instant
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        threading.Timer(0.06, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with holding(run):
            pass


def test_a_finished_run_is_not_trained_again_unless_asked_for_more(tmp_path):
    """A relaunch of a run that did every planned step, with the same job, has nothing to do;
    more steps, or a damaged last checkpoint (resumed from an earlier one), are work."""
    job = config_from_dict({"data": {"train": "x.jsonl"}, "storage": {"path": str(tmp_path)},
                            "train": {"max_steps": 12}})
    run = RunFolder.for_job(job)
    (tmp_path / job.run_name).mkdir()
    (tmp_path / job.run_name / "config.yaml").write_text(dump_yaml(job))
    summary = {"steps": 12, "planned_steps": 12, "latest_checkpoint": run.uri_of("checkpoint-000012")}
    (tmp_path / job.run_name / "summary.json").write_text(json.dumps(summary))
    assert finished_run(job, run, "checkpoint-000012") == summary
    assert finished_run(job, run, "checkpoint-000008") is None  # the newest one damaged since
    assert finished_run(job, run, None) is None
    more = config_from_dict({**job.model_dump(mode="json"), "train": {**job.train.model_dump(), "max_steps": 20}})
    assert finished_run(more, run, "checkpoint-000012") is None
    # a run an earlier ft-ray finished, its config.yaml without the settings added since: done too
    saved = yaml.safe_load(dump_yaml(job))
    for key in ("early_stopping_patience", "early_stopping_min_delta", "lr_schedule"):
        del saved["train"][key]
    (tmp_path / job.run_name / "config.yaml").write_text(yaml.safe_dump(saved))
    assert finished_run(job, run, "checkpoint-000012") == summary


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_follows_its_schedule(schedule):
    from ft_ray.config import TrainConfig
    from ft_ray.train.engine_api import lr_multiplier

    rate = lr_multiplier(TrainConfig(warmup_steps=4, lr_schedule=schedule, min_lr_ratio=0.2), total_steps=24)
    assert [rate(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # never a step at 0
    middle, last = rate(14), rate(24)
    assert (middle, last) == pytest.approx({"cosine": (0.6, 0.2), "linear": (0.6, 0.2), "constant": (1.0, 1.0)}[schedule])
    assert rate(9) == pytest.approx({"cosine": 0.2 + 0.8 * 0.5 * (1 + 0.7071068), "linear": 0.8,
                                     "constant": 1.0}[schedule])
