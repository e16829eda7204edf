"""`ft-ray validate`: format, counts, the too-little-data and context-window warnings."""

import json
import shutil

from ft_ray.cli import main
from tests.conftest import ASSETS, write_job


def test_reports_detected_format_and_counts(tmp_path, capsys):
    job = write_job(tmp_path, data={"eval_sets": {"general": str(ASSETS / "text.jsonl")}})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out.splitlines()
    counts = json.loads(out[1])
    assert counts["train_records"] == 400 and counts["eval_records"] == 48 and counts["eval_sets"] == {"general": 2}
    assert counts["unreadable_records"] == 0
    assert "data.eval_sets.general: 2 records, scored as eval_general_loss at every evaluation" in out
    assert counts["formats"] == {"instruction": 100}
    assert any(line.startswith("data.train: format auto -> instruction (20 of the first 20 records") for line in out)
    assert not any(line.startswith("warning:") for line in out)
    assert out[-1].startswith("plan: peak ") and "per worker" in out[-1]  # the one-line ft-ray plan
    assert "data.train: tokens per example (first 100): mean 107, p95 114, max 114, 42% trained (data.loss_on answers); 0 longer than max_seq_len 128" in out


def test_records_longer_than_max_seq_len_are_counted_whole_and_warned_of(tmp_path, capsys):
    assert main(["validate", str(write_job(tmp_path, model={"max_seq_len": 64}))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("data.train: tokens per example (first 100): mean 107, p95 114, max 114, 42% trained (data.loss_on answers); 100 longer than max_seq_len 64 "
            "(cut at the end: data.overlong truncate)") in out
    assert ("warning: 100 of the first 100 data.train records are longer than model.max_seq_len 64 and lose their "
            "ends; raise it (p95 114) or shorten them") in out
    assert json.loads(out[1])["train_tokens_estimate"] == 400 * 64  # what training keeps of them


def test_warns_below_100_training_examples_and_lists_bad_lines(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    shutil.copy(ASSETS / "instruction.jsonl", data)
    with data.open("a") as f:
        f.write("{not json\n")
    job = write_job(tmp_path, data={"train": str(data), "eval": None, "eval_fraction": 0.0},
                    model={"max_seq_len": 2048})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "warning: only 2 training examples (and 1 unreadable record);" in out  # the broken line is no example
    assert ("warning: model.max_seq_len 2048 is longer than builtin:tiny-llama's context window (1024 positions, "
            "max_position_embeddings): the positions past it were never trained") in out
    assert f"problem: {data}:3: not_json: not JSON" in out
    assert "data.train: tokens per example (the 2 usable of the first 3): mean " in out
    assert ("warning: 1 of the first 3 data.train records have problems (33%), more than data.max_rejected_fraction "
            "0.01 lets a run set aside: training would stop once its data is read; mend them or raise "
            "data.max_rejected_fraction") in out
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "no output"}\n{"instruction": "a", "output": 5}\n')
    job = write_job(tmp_path, data={"train": str(broken), "format": "instruction", "eval": None,
                                    "eval_fraction": 0.0, "max_rejected_fraction": 0.5})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "data.train: none of the first 2 records can train" in out and "warning: 2 of the first 2" in out
    assert f"problem: {broken}:2: wrong_type: field 'output' must be a string, got int" in out
    job = write_job(tmp_path, data={"train": str(data), "eval": None, "eval_fraction": 0.0},
                    model={"max_seq_len": 2048, "rope_scaling": "yarn"})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "model: RoPE stretched (yarn, factor 2): 1024 -> 2048 positions" in out and "context window" not in out


def test_eval_records_that_are_training_records_too_are_counted(tmp_path, capsys):
    """The same example in data.eval and data.train (another key order, other spacing, another
    column name through its source's fields) makes the eval measure recall: said before launch."""
    from tests.conftest import DEMO

    train = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    copied = [json.dumps(train[3]), json.dumps(dict(reversed(list(train[7].items()))), indent=1).replace("\n", ""),
              json.dumps({"question": train[9]["instruction"], **{k: v for k, v in train[9].items()
                                                                   if k != "instruction"}})]
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text((DEMO / "eval.jsonl").read_text() + "\n".join(copied + [copied[0]]) + "\n")
    job = write_job(tmp_path, data={"eval": {"path": str(held_out), "fields": {"instruction": "question"}}})
    assert main(["validate", str(job)]) == 0
    assert ("warning: 4 of the 52 data.eval records are training examples too (the same record in the training data): loss "
            "and ft-ray eval on them measure recall, not what was learned; take them out of one side"
            ) in capsys.readouterr().out


def test_a_grpo_job_s_rewards_are_imported_as_its_workers_will(tmp_path, capsys):
    rewards = {"chrf": 1.0, "tests.grpo_rewards:opens_like_the_reference": 0.5, "my_rewards:is_polite": 2.0}
    assert main(["validate", "--offline", str(write_job(tmp_path, objective="grpo", grpo={"rewards": rewards}))]) == 0
    out = capsys.readouterr().out
    assert "problem: grpo.rewards: cannot import my_rewards:is_polite (ModuleNotFoundError" in out
    del rewards["my_rewards:is_polite"]
    assert main(["validate", "--offline", str(write_job(tmp_path, objective="grpo", grpo={"rewards": rewards}))]) == 0
    assert "grpo: rewards chrf x 1, tests.grpo_rewards:opens_like_the_reference x 0.5" in capsys.readouterr().out


def test_a_teacher_of_another_tokenizer_says_how_many_trained_tokens_it_matches(tmp_path, capsys):
    """distill.divergence uld: validate says how many of the teacher's tokens are also the
    model's, reads the first records in the teacher's tokens and says how many of their trained
    tokens it matches (the others train on their next-token loss only): this teacher's tokens
    end in spaces and cross words ("Hi ", ", thanks for writing to Northwind."), so few of the
    model's start where one of its tokens does; and it reads the records (their prompts, which
    it never learnt its merges from) in more tokens than the model."""
    from tests.conftest import cross_tokenizer_llama

    teacher = cross_tokenizer_llama(tmp_path / "teacher", permuted=False)  # merges across words: fewer tokens
    job = write_job(tmp_path, objective="distill", distill={"teacher": str(teacher), "divergence": "uld"})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    # 315 tokens of the same string, and the two bos and eos, paired whatever their strings, as the workers pair them
    assert (f"distill: teacher {teacher} (uld, its own tokenizer (520 tokens), 317 of its tokens also the model's, "
            "compared token by token, the others sorted, temperature 1, ratio 0.5)") in out
    assert ("data.train: the teacher (uld, its own tokens) matches 703 of the 4,548 trained tokens of the first "
            "records (15%: read after the same text); the others add their next-token loss only. It reads those "
            "records in 13,477 tokens of its own, the model in 10,745 (25% more: ft-ray plan counts the teacher's "
            "forward in the model's tokens)") in out


def test_missing_data_file_exits_2(tmp_path, capsys):
    job = write_job(tmp_path, data={"train": str(tmp_path / "nope.jsonl")})
    assert main(["validate", str(job)]) == 2
    assert "data.train: no data files at" in capsys.readouterr().err


def test_a_model_that_is_not_here_is_said_in_one_line_naming_the_key(tmp_path, capsys):
    # a path with no folder is not sent to the hub as an id; a hub id neither cached nor
    # reachable (tests run with HF_HUB_OFFLINE=1) is said as transformers says it, traceback-free
    for name, said in [(str(tmp_path / "my-model"), f"model.name_or_path: no folder {tmp_path / 'my-model'}"),
                       ("no-such-org/no-such-model", "model.name_or_path: cannot load the tokenizer of "
                                                     "no-such-org/no-such-model: ")]:
        job = write_job(tmp_path, model={"name_or_path": name})
        assert main(["validate", str(job)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err


def test_with_the_hub_unreachable_a_cached_model_loads_and_an_uncached_one_is_said_at_once(tmp_path, monkeypatch,
                                                                                             capsys):
    # huggingface_hub retries a refused connection for about 25 s a file before transformers
    # falls back to the cache; one request with no retries decides instead
    import time

    import huggingface_hub.constants as hub

    from ft_ray.config import ModelConfig
    from ft_ray.models import ASSETS as MODELS
    from ft_ray.models import load_base_model
    from ft_ray.train.trainer import free_port

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    shutil.copytree(MODELS / "tiny-llama", snapshot, dirs_exist_ok=True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # tests run offline; this one asks a refused port
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    said = f"hub cannot be reached ({hub.ENDPOINT}: "
    started = time.monotonic()
    assert main(["validate", str(write_job(tmp_path, model={"name_or_path": "acme/tiny"}))]) == 0
    assert f"warning: the Hugging Face {said}" in capsys.readouterr().out, "the cached copy was loaded without saying so"
    assert load_base_model(ModelConfig(name_or_path="acme/tiny")).config.hidden_size == 128  # as workers load it
    job = write_job(tmp_path, model={"name_or_path": "acme/other"})
    assert main(["validate", str(job)]) == 2
    assert ("model.name_or_path: cannot load the tokenizer of acme/other: acme/other is not in the Hugging Face "
            f"cache, and the {said}") in capsys.readouterr().err
    assert main(["plan", str(job)]) == 2
    assert ("model.name_or_path: cannot read the config.json of acme/other: OSError: acme/other is not in the "
            f"Hugging Face cache, and the {said}") in capsys.readouterr().err
    assert time.monotonic() - started < 30, "the hub was asked with retries"


def test_train_and_prepare_say_a_model_or_data_that_is_not_here_before_ray_starts(tmp_path, monkeypatch, capsys):
    import pytest

    from ft_ray.train import trainer

    monkeypatch.setattr(trainer, "connect_ray", lambda config: pytest.fail("Ray started before the job was read"))
    for command in ("train", "prepare"):
        assert main([command, str(write_job(tmp_path, model={"name_or_path": str(tmp_path / "my-model")}))]) == 2
        assert f"model.name_or_path: no folder {tmp_path / 'my-model'}" in capsys.readouterr().err
        job = write_job(tmp_path, data={"train": str(tmp_path / "nope.jsonl")}, model={"max_seq_len": 2048})
        assert main([command, str(job)]) == 2
        out, err = capsys.readouterr()
        assert f"data.train: no data files at '{tmp_path / 'nope.jsonl'}'" in err
        # said first, by train: a sequence length past the model's positions
        assert ("model.max_seq_len 2048 is longer than builtin:tiny-llama's context window" in out) == (command == "train")
    assert main(["train", str(write_job(tmp_path, model={"rope_scaling": "linear"}))]) == 2
    assert "context window (1024 positions) holds model.max_seq_len 128: nothing to stretch" in capsys.readouterr().err
    job = write_job(tmp_path, objective="grpo", grpo={"rewards": {"my_rewards:is_polite": 1.0}})
    assert main(["train", str(job)]) == 2
    assert "grpo.rewards: cannot import my_rewards:is_polite (ModuleNotFoundError" in capsys.readouterr().err


def test_online_wandb_without_an_api_key_is_said_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Else the run fails at its first step, after Ray started and the data was prepared."""
    import pytest

    from ft_ray.train import trainer

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setattr(trainer, "connect_ray", lambda *a, **k: pytest.fail("Ray started"))  # train's and tune's
    job = write_job(tmp_path, tracking={"wandb": {"mode": "online"}},
                    tune={"search_space": {"train.learning_rate": {"choice": [1e-3, 2e-3]}}})
    message = "tracking.wandb.mode is online but no W&B API key is set here: set WANDB_API_KEY"
    for command in ("train", "tune"):
        assert main([command, str(job)]) == 2
        assert message in capsys.readouterr().err
    assert main(["validate", "--offline", str(job)]) == 0
    assert f"warning: {message}" in capsys.readouterr().out
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert main(["validate", "--offline", str(job)]) == 0
    assert "W&B API key" not in capsys.readouterr().out


def test_a_gpu_job_on_a_machine_without_one_is_refused_not_left_waiting(tmp_path, monkeypatch, capsys):
    """Local Ray (started here, or already running in this process) would have no GPU: the
    workers would wait for one forever (0/10 steps for as long as one looks)."""
    import pytest
    import torch

    from ft_ray.data import prepared
    from ft_ray.train import trainer

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for module, name in ((trainer, "datasets_for"), (prepared, "prepared_stats")):  # what train and tune do next
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the job went on without a GPU"))
    job = write_job(tmp_path, distributed={"use_gpu": True},
                    tune={"search_space": {"train.learning_rate": {"choice": [1e-3, 2e-3]}}})
    for command in ("train", "tune"):
        assert main([command, str(job)]) == 2
        assert "distributed.use_gpu is true, but there is no GPU here" in capsys.readouterr().err


def test_an_unreachable_store_is_said_at_once_by_validate_and_plan(tmp_path, capsys):
    # `storage.max_attempts` (10) would back off for about 80 s per request; validate and plan
    # try 3 times (about 1.5 s against a refused connection)
    import time

    from ft_ray.train.trainer import free_port

    store = {"path": "s3://no-store/runs", "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    job = write_job(tmp_path, data={"train": "s3://no-store/data/train.jsonl", "eval": None},
                    storage=store, distributed={"use_gpu": True})
    started = time.monotonic()
    assert main(["validate", str(job)]) == 2
    assert "data.train: cannot list 's3://no-store/data/train.jsonl'" in capsys.readouterr().err
    assert main(["plan", str(job)]) == 0  # the memory is planned; the time needs the data or --train-tokens
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("time: not estimated (data.train: cannot list 's3://no-store/data/train.jsonl'")
    assert line.endswith("give --train-tokens)")
    assert time.monotonic() - started < 30, "a request was retried as often as training retries it"
