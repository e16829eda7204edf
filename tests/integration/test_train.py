"""Two Ray Train workers fine-tune the built-in model end to end on the session's local Ray."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft_ray.cli import main
from ft_ray.config import InputError, load_config
from ft_ray.train.trainer import run_training
from tests.conftest import DEMO, SECRET_CANARY, write_job
from tests.faults import ray_actor_processes, wait_for
from tests.wandb_offline import read_offline_run

pytestmark = pytest.mark.integration

GENERAL_TEXT = ["The river rose after three days of rain.", "She sold the old piano to a school in town.",
                "Most maps of the coast were drawn by hand.", "A kettle whistles when the water boils.",
                "The library opens at nine on weekdays.", "Bees carry pollen from flower to flower."]
SUMMARY_KEYS = {"run_name", "steps", "train_tokens", "train_loss_final", "eval_loss_initial", "eval_loss_final",
                "tokens_per_second", "best_checkpoint", "adapter_path"}


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """One 2-worker LoRA run of 6 steps with two bad records in its corpus, and a set of
    general text scored beside data.eval (data.eval_sets)."""
    tmp = tmp_path_factory.mktemp("trained")
    corpus = tmp / "train.jsonl"
    shutil.copy(DEMO / "train.jsonl", corpus)
    with corpus.open("a") as f:
        f.write('{"instruction": "no output"}\n{broken json\n')
    general = tmp / "general.jsonl"  # its last line bad: set aside as the training data's are
    general.write_text("".join(json.dumps({"text": text}) + "\n" for text in GENERAL_TEXT) + "{broken\n")
    config = load_config(write_job(tmp, data={"train": str(corpus), "eval_sets": {"general": str(general)}},
                                   train={"max_steps": 6, "checkpoint_every": 3,
                                                                         "lr_schedule": "linear", "min_lr_ratio": 0.5},
                                   tracking={"wandb": {"mode": "offline", "project": "ft-ray-tests"}}))
    summary = run_training(config)
    return config, summary, Path(config.storage.path) / config.run_name


def test_summary_has_the_outcome(trained):
    config, summary, run = trained
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["run_name"] == "test-run"
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["train_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert Path(summary["best_checkpoint"]).parent == run
    assert (summary["data"]["records_truncated"], summary["data"]["tokens_dropped"]) == (0, 0)  # the demo fits


def test_a_finished_run_gives_back_ctrl_c_and_its_controller(trained):
    # Ray Train's fit() sets its own SIGINT handler (abort that run) holding the run's
    # controller: after run_training, Ctrl-C interrupts the process again and the controller's
    # actor ends (a notebook, or a driver that goes on to other work).
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    wait_for(lambda: not ray_actor_processes("TrainController"), 30, "the finished run's controller gone")


def test_metrics_hold_every_step_once(trained):
    _, _, run = trained
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m["step"] for m in lines if "loss" in m]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 2, 3, 4, 6]
    assert all({"lr", "grad_norm", "tokens_per_s"} <= set(m) for m in lines if "loss" in m)
    # the rate each step leaves for the next: warmup done at step 1, then linear to half at step 6
    assert [m["lr"] for m in lines if "loss" in m] == pytest.approx([2e-3 * (1 - 0.1 * i) for i in range(6)])


def test_an_eval_set_is_scored_at_every_evaluation_as_the_base_model_scores_it(trained):
    import torch

    from ft_ray.data.records import parse_record
    from ft_ray.models import load_base_model, load_tokenizer

    config, summary, run = trained
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    general = [(m["step"], m["eval_general_loss"]) for m in lines if "eval_general_loss" in m]
    assert [step for step, _ in general] == [m["step"] for m in lines if "eval_loss" in m]
    assert summary["data"]["eval_sets"]["general"]["examples"] == len(GENERAL_TEXT)
    assert summary["data"]["formats"]["data.eval_sets.general"] == "text"
    assert summary["eval_sets"]["general"]["loss_initial"] == general[0][1]
    assert summary["eval_sets"]["general"]["loss_final"] == general[-1][1]
    # step 0 is the base model (LoRA's B starts at zero): its mean loss per target token on the
    # set's records, each alone
    tokenizer, model = load_tokenizer(config.model), load_base_model(config.model).eval()
    total = count = 0
    for text in GENERAL_TEXT:
        example = parse_record(json.dumps({"text": text}), "", "text", {}, tokenizer, 128, None)
        targets = sum(label != -100 for label in example["labels"][1:])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]))
        total, count = total + out.loss.item() * targets, count + targets
    assert general[0][1] == pytest.approx(total / count, rel=1e-4)


def test_checkpoints_hold_adapter_optimizer_and_data_position(trained):
    _, _, run = trained
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000006"]
    checkpoint = run / "checkpoint-000006"
    assert (checkpoint / "model" / "adapter_model.safetensors").exists()
    assert (checkpoint / "optimizer.pt").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["batch_in_epoch"] > 0


def test_bad_records_are_set_aside_with_reasons(trained):
    _, summary, run = trained
    data = summary["data"]
    assert data["records_read"] == 402 + 48 + 7 and data["records_rejected"] == 3  # 7: data.eval_sets.general
    assert data["train_examples"] == 400 and data["eval_examples"] == 48
    assert data["rejected_by_reason"] == {"missing_field": 1, "not_json": 2}
    rejected = [json.loads(line) for f in (run / "rejected").glob("*.json*") for line in f.read_text().splitlines()]
    assert sorted((r["line"], r["reason"], r["detail"]) for r in rejected) == [
        (7, "not_json", "not JSON: Expecting property name enclosed in double quotes at column 2"),
        (401, "missing_field", "missing field 'output'"),
        (402, "not_json", "not JSON: Expecting property name enclosed in double quotes at column 2")]
    assert [Path(r["path"]).name for r in sorted(rejected, key=lambda r: r["line"])] == [
        "general.jsonl", "train.jsonl", "train.jsonl"]


def test_wandb_offline_run_has_config_and_metrics_and_no_secret(trained):
    _, _, run = trained
    [run_file] = run.glob("wandb/offline-run-*/run-*.wandb")
    wandb_run = read_offline_run(run_file)
    assert wandb_run["config"]["run_name"] == "test-run"
    assert wandb_run["config"]["lora"]["rank"] == 4
    logged = {(h["_step"], key) for h in wandb_run["history"] for key in h if not key.startswith("_")}
    assert {(step, "loss") for step in range(1, 7)} <= logged
    assert (6, "eval_loss") in logged
    for path in [p for p in run.rglob("*") if p.is_file()]:
        assert SECRET_CANARY.encode() not in path.read_bytes(), f"secret leaked into {path}"


LOAD_WITHOUT_FT_RAY = """
import sys
sys.modules["ft_ray"] = None  # any import of ft-ray fails: the output must stand alone
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
adapter, merged = sys.argv[1], sys.argv[2]
base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
tokenizer = AutoTokenizer.from_pretrained(adapter)
ids = tokenizer("### Instruction:\\nReply in the Northwind house style.", return_tensors="pt").input_ids
with torch.no_grad():
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()(ids).logits
    via_merge = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    plain_base = AutoModelForCausalLM.from_pretrained(base_path).eval()(ids).logits
print(json.dumps({"max_diff": (via_peft - via_merge).abs().max().item(),
                  "adapter_changes_output": (via_peft - plain_base).abs().max().item()}))
"""


def test_export_adapter_and_merged_model_load_without_ft_ray(trained, tmp_path, capsys):
    _, summary, run = trained
    for out in ("adapter", "merged"):
        assert main(["export", str(run), "--out", str(tmp_path / out)]) == 0
    # a merged model over an adapter export: refused, then replaced whole (transformers would
    # load the adapter it found beside the weights)
    merge = ["export", str(run / "checkpoint-000006"), "--out", str(tmp_path / "merged"), "--merge"]
    assert main(merge) == 2
    assert f"--out {tmp_path / 'merged'} is not empty (README.md, adapter_config.json" in capsys.readouterr().err
    assert main([*merge, "--overwrite"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not list((tmp_path / "merged").glob("adapter_*")) and not list(tmp_path.glob(".merged.partial-*"))
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FT_RAY, str(tmp_path / "adapter"), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_diff"] < 1e-4
    assert result["adapter_changes_output"] > 1e-3


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_generate_answers_prompts_as_the_run_was_trained(trained, tmp_path, capsys, monkeypatch):
    """`ft-ray generate`: typed prompts put as the run's instruction data was (the Alpaca
    prompt), answered greedily by the run's adapter and, with --compare, the base model, as
    plain PEFT answers them; a file of records shows their answers as the reference; stdin
    gives one prompt per line; a merged export takes the job from --config; train.compare_generations
    answers the first held-out records as --file does."""
    from peft import PeftModel

    from ft_ray.data.formats import alpaca_prompt
    from ft_ray.models import generate, load_base_model, load_tokenizer
    from ft_ray.samples import compare_generations

    config, summary, run = trained
    asked = ["Say hi.", "Name a tent."]
    command = ["generate", str(run), "--compare", "--json", "--max-new-tokens", "12"]
    assert main([*command, "--prompt", asked[0], "--prompt", asked[1]]) == 0
    results = json_lines(capsys.readouterr().out)
    tokenizer = load_tokenizer(config.model)
    assert [r["prompt"] for r in results] == [alpaca_prompt(p) for p in asked]
    base = load_base_model(config.model)
    assert [r["base"] for r in results] == [generate(base, tokenizer, r["prompt"], 12).strip() for r in results]
    variant = PeftModel.from_pretrained(base, summary["adapter_path"])
    assert [r["variant"] for r in results] == [generate(variant, tokenizer, r["prompt"], 12).strip() for r in results]

    records = [json.loads(line) for line in (DEMO / "eval.jsonl").read_text().splitlines()[:2]]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([*command, "--file", str(tmp_path / "few.jsonl")]) == 0
    from_file = json_lines(capsys.readouterr().out)
    assert [r["reference"] for r in from_file] == [r["output"] for r in records]
    # train.compare_generations: the same first held-out records, answered the same way
    assert [(s["prompt"], s["reference"], s["base"].strip(), s["variant"].strip())
            for s in compare_generations(config, summary["adapter_path"], 2, 12)] == [
        (r["prompt"], r["reference"], r["base"], r["variant"]) for r in from_file]
    (tmp_path / "few.jsonl.gz").write_bytes(gzip.compress(b'{"instruction": "Say hi.", "output": "hi"}\n{broken\n'))
    assert main([*command, "--file", str(tmp_path / "few.jsonl.gz")]) == 2  # read as training reads it
    assert "few.jsonl.gz:2: Expecting property name" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stdin in (io.StringIO, Terminal):  # piped lines; typed at a "> " (Ctrl-D: the end of input)
        monkeypatch.setattr(sys, "stdin", stdin(f"{asked[0]}\n\n{asked[1]}\n"))
        assert main(["generate", str(run), "--max-new-tokens", "12"]) == 0
        out = capsys.readouterr().out
        assert [line.split("variant: ", 1)[1] for line in out.splitlines() if "variant: " in line] == [
            r["variant"] for r in results]
        assert out.count("> ") == (4 if stdin is Terminal else 0)  # asked again after the empty line and at the end

    merged = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(merged), "--merge"]) == 0
    assert main(["generate", str(merged), "--prompt", asked[0]]) == 2
    assert "no config.yaml of a run here or in the folder above it: name the job" in capsys.readouterr().err
    assert main(["generate", str(merged), "--config", str(run / "config.yaml"), "--json", "--max-new-tokens", "12",
                 "--prompt", asked[0]]) == 0
    assert json_lines(capsys.readouterr().out)[0]["variant"] == results[0]["variant"]


def test_runs_lists_finished_interrupted_and_running_runs(trained, tmp_path, capsys):
    """`ft-ray runs`: one line per run folder with what a user asks first: how far, the eval
    loss, and finished, running (and by whom) or what a relaunch resumes from."""
    from ft_ray.storage import RunFolder
    from ft_ray.train.trainer import holding

    _, summary, run = trained
    runs = tmp_path / "runs"
    for name in ("done", "cut", "live", "more"):
        shutil.copytree(run, runs / name)
    (runs / "cut" / "summary.json").unlink()  # the driver died before the end
    (runs / "live" / "summary.json").unlink()
    with open(runs / "more" / "metrics.jsonl", "a") as f:  # relaunched for more steps, died after step 7
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    (runs / "prepared" / "abc").mkdir(parents=True)  # not a run: no config.yaml
    with holding(RunFolder.at(str(runs / "live"), load_config(run / "config.yaml").storage)):
        assert main(["runs", str(runs), "--json"]) == 0
        records = {r["name"]: r for r in json_lines(capsys.readouterr().out)}
        assert main(["runs", str(runs)]) == 0
        table = capsys.readouterr().out.splitlines()
    assert sorted(records) == ["cut", "done", "live", "more"]
    done = records["done"]
    assert (done["step"], done["planned_steps"], done["status"]) == (6, 6, "finished")
    assert done["eval_loss"] == [summary["eval_loss_initial"], summary["eval_loss_final"]]
    assert records["cut"]["status"] == "interrupted at step 6: a relaunch resumes from checkpoint-000006"
    assert records["live"]["status"].startswith(f"running (pid {os.getpid()} on ")
    assert records["more"]["status"] == "interrupted at step 7: a relaunch resumes from checkpoint-000006"
    assert table[0].split() == ["run", "method", "steps", "eval", "loss", "updated", "(UTC)", "status"]
    assert table[2].startswith("done ") and "6/6" in table[2] and table[2].endswith("finished")
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_export_of_a_folder_without_checkpoints_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_too_many_bad_records_fail_before_training(ray_local, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("".join('{"text": ""}\n' if i % 2 else '{"text": "fine"}\n' for i in range(40)))
    config = load_config(write_job(tmp_path, run_name="bad-data", data={"train": str(corpus), "eval": None}))
    with pytest.raises(ValueError, match=r"20 of 40 records rejected \(50.0%\).*most common reason: empty_field \(20x\)"):
        run_training(config)
    assert list((Path(config.storage.path) / "bad-data" / "rejected").glob("*.json*"))


def test_workers_larger_than_any_node_are_refused_before_ray_train_waits_for_them(ray_local, tmp_path):
    """The session's Ray has one node of 4 CPUs and no autoscaler: Ray Train would wait for
    an 8-CPU worker forever (asking again every minute)."""
    config = load_config(write_job(tmp_path, run_name="too-large", distributed={"num_workers": 1, "cpus_per_worker": 8}))
    with pytest.raises(InputError, match=r"cannot be placed on this cluster: no node has 8 CPU for one worker "
                                         r"\(the largest has 4 CPU\)"):
        run_training(config)
    assert not (Path(config.storage.path) / "too-large" / "config.yaml").exists()  # refused before anything was written


def test_a_damaged_checkpoint_is_neither_exported_nor_evaluated(trained, tmp_path, capsys):
    from ft_ray.evaluation.evaluate import resolve_target
    from ft_ray.models import adapter_folder

    config, _, run = trained
    shutil.copytree(run, tmp_path / "run")
    changed, cut = tmp_path / "run" / "checkpoint-000006", tmp_path / "run" / "checkpoint-000003"
    weights = changed / "model" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    (cut / "manifest.json").unlink()  # an upload cut before its manifest
    assert main(["export", str(changed), "--out", str(tmp_path / "out")]) == 2
    assert "model/adapter_model.safetensors has sha256" in capsys.readouterr().err
    assert main(["export", str(cut), "--out", str(tmp_path / "out")]) == 2
    assert "no manifest.json (the upload did not finish); not exported" in capsys.readouterr().err
    with pytest.raises(InputError, match="adapter_model.safetensors has sha256"):
        with resolve_target(str(changed), config):  # `ft-ray eval --run CHECKPOINT`
            pass
    for checkpoint, why in ((changed, "model/adapter_model.safetensors has sha256"), (cut, "no manifest.json")):
        with pytest.raises(InputError, match=f"model.adapter: {checkpoint}: {why}"):  # nor trained on from
            adapter_folder(str(checkpoint), config.storage)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_workers_read_their_pieces_in_order_even_when_batches_are_ready_out_of_order(ray_local):
    """Ray Train builds the workers' readers in its controller, whose Ray Data context says
    preserve_order=False; batches formatted by several threads (prefetch) that finish out of
    order must still reach the worker in the data's order, or a resumed run trains other steps."""
    import random
    import time

    import ray.data

    from ft_ray.train.trainer import ingest_config

    @ray.remote
    def read_as_a_worker(data_config, piece) -> list[int]:
        ray.data.DataContext.get_current().execution_options.preserve_order = False  # the controller's default
        reader = data_config.configure({"train_0": piece}, world_size=1, worker_handles=None,
                                       worker_node_ids=None)[0]["train_0"]

        def format_slowly_at_random(batch):
            time.sleep(random.random() * 0.02)
            return batch

        return [int(batch["id"][0]) for batch in reader.iter_torch_batches(
            batch_size=2, prefetch_batches=4, collate_fn=format_slowly_at_random)]

    # from_items: blocks in the items' order (a materialized range() has its blocks in the
    # order its read tasks finished, unless the driver's context says preserve_order)
    piece = ray.data.from_items([{"id": i} for i in range(64)], override_num_blocks=16).materialize()
    assert ray.get(read_as_a_worker.remote(ingest_config(), piece)) == list(range(0, 64, 2))


def test_each_later_epoch_is_read_in_its_own_order_and_again_so_on_resume(ray_local, tmp_path):
    """An epoch after the first reads a worker's pieces shuffled (train.epoch_shuffle_buffer)
    with a seed of its own, the same in a rerun and in a resume inside the epoch (Ray's local
    shuffle, fed the pieces' blocks in order); 0 reads every epoch in the first's order."""
    import itertools

    import ray.data

    from ft_ray.config import JobConfig
    from ft_ray.train.checkpoint_io import TrainState
    from ft_ray.train.loop import batches
    from ft_ray.train.trainer import ingest_config
    from tests.conftest import tiny_job

    @ray.remote
    def read_as_a_worker(job, pieces, epoch: int, batch_in_epoch: int, count: int) -> list[list[int]]:
        ray.data.DataContext.get_current().execution_options.preserve_order = False  # the controller's default
        readers = ingest_config().configure({f"train_{i}": p for i, p in pieces.items()}, world_size=1,
                                            worker_handles=None, worker_node_ids=None)[0]
        state = TrainState(epoch=epoch, batch_in_epoch=batch_in_epoch)
        mine = {i: readers[f"train_{i}"] for i in pieces}
        return [batch["id"].tolist() for batch in itertools.islice(batches(mine, job, state), count)]

    def job(buffer: int) -> JobConfig:
        return JobConfig.model_validate(tiny_job(tmp_path, train={"micro_batch_size": 4,
                                                                  "epoch_shuffle_buffer": buffer}))

    pieces = {p: ray.data.from_items([{"id": i} for i in ids], override_num_blocks=4).materialize()
              for p, ids in ((0, range(24)), (2, range(100, 124)))}  # rank 0 of 2: pieces 0 and 2
    first = list(range(24)) + list(range(100, 124))
    flat = lambda steps: [i for step in steps for i in step]  # noqa: E731
    three = ray.get(read_as_a_worker.remote(job(1024), pieces, 0, 0, 36))
    epochs = [flat(three[i:i + 12]) for i in (0, 12, 24)]
    assert epochs[0] == first
    for later in epochs[1:]:
        assert sorted(later) == first and later != first
        assert later[:24] != first[:24] and sorted(later[:24]) == first[:24]  # piece by piece, each shuffled
    assert epochs[1] != epochs[2]
    assert {frozenset(b) for b in three[:12]}.isdisjoint({frozenset(b) for b in three[12:24]})  # new neighbours
    assert ray.get(read_as_a_worker.remote(job(1024), pieces, 1, 3, 21)) == three[15:]  # resumed at batch 3
    assert flat(ray.get(read_as_a_worker.remote(job(0), pieces, 0, 0, 24))) == first * 2
