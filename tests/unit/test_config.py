"""The job schema: defaults that work, overrides, and errors a person can act on."""

from pathlib import Path

import pytest
import yaml

from ft_ray.cli import main
from ft_ray.config import ConfigError, config_from_dict, load_config, resume_changes
from tests.conftest import REPO, write_job


def test_shipped_demo_config_is_valid():
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    assert config.method == "lora"
    assert config.distributed.num_workers == 2
    assert Path(config.data.train).is_absolute() and Path(config.data.train).exists()


def test_set_overrides_coerce_types(tmp_path):
    config = load_config(write_job(tmp_path), ["train.learning_rate=3e-4", "distributed.num_workers=3",
                                               "lora.target_modules=[q_proj, v_proj]", "data.pack=false"])
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.distributed.num_workers == 3
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.pack is False


def test_bad_value_names_file_line_and_key(tmp_path):
    path = write_job(tmp_path, train={"learning_rate": -1})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "learning_rate" in text)
    assert problem == f"{path}:{line}: train.learning_rate: must be > 0"


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write_job(tmp_path, lora={"rnak": 8})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].endswith("unknown key 'lora.rnak' (did you mean 'rank'?)")


def test_a_peer_tools_name_for_a_setting_names_ft_rays_key(tmp_path):
    """Keys as TRL / transformers, Axolotl or LLaMA-Factory spell them, in any section."""
    path = write_job(tmp_path, train={"lr": 1e-4, "gradient_accumulation_steps": 2, "neftune_noise_alpha": 5},
                     lora={"lora_alpha": 16},
                     sequence_len=512, train_on_inputs=True, optim="adamw_8bit")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert sorted(p.split(": ", 1)[1] for p in info.value.problems) == [
        "unknown key 'lora.lora_alpha' (ft-ray's key: 'lora.alpha')",
        "unknown key 'optim' (ft-ray's key: 'train.optimizer')",
        "unknown key 'sequence_len' (ft-ray's key: 'model.max_seq_len')",
        "unknown key 'train.gradient_accumulation_steps' (ft-ray's key: 'train.gradient_accumulation')",
        "unknown key 'train.lr' (ft-ray's key: 'train.learning_rate')",
        "unknown key 'train.neftune_noise_alpha' (ft-ray's key: 'train.neftune_alpha')",
        "unknown key 'train_on_inputs' (ft-ray's key: 'data.loss_on: all')"]


def test_every_problem_reported_at_once(tmp_path):
    path = write_job(tmp_path, method="qlorra", train={"micro_batch_size": 0}, storage={"pth": "x"})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3
    assert "method: must be one of 'full', 'lora' or 'qlora', got 'qlorra'" in text
    assert "train.micro_batch_size: must be > 0" in text
    assert "unknown key 'storage.pth' (did you mean 'path'?)" in text


def test_missing_data_train_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"run_name": "x"}))
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(path)


def test_cli_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path, capsys):
    path = write_job(tmp_path, train={"learning_rate": 0}, lora={"rnak": 4})
    assert main(["validate", str(path), "--offline"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 2
    assert "train.learning_rate: must be > 0" in err and "did you mean 'rank'" in err


def test_bad_set_override_is_a_config_error(tmp_path, capsys):
    assert main(["validate", str(write_job(tmp_path)), "--offline", "--set", "train.learning_rate"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_a_problem_in_a_set_value_is_said_as_the_set_not_as_the_file_s_line(tmp_path, capsys):
    path = write_job(tmp_path, train={"learning_rate": 0})
    line = path.read_text().splitlines().index("  learning_rate: 0") + 1
    assert main(["validate", str(path), "--offline", "--set", "train.micro_batch_size=0", "--set", "lora.rnak=3",
                 "--set", "eval={max_examples: 0}", "--set", "trian.max_steps=3"]) == 2
    assert sorted(capsys.readouterr().err.splitlines()) == sorted([
        f"[ft-ray] error: {path}:{line}: train.learning_rate: must be > 0",  # still the file's
        "[ft-ray] error: --set train.micro_batch_size=0: train.micro_batch_size: must be > 0",
        "[ft-ray] error: --set lora.rnak=3: unknown key 'lora.rnak' (did you mean 'rank'?)",
        "[ft-ray] error: --set trian.max_steps=3: unknown key 'trian' (did you mean 'train'?)",  # a section it made
        "[ft-ray] error: --set eval={max_examples: 0}: eval.max_examples: must be > 0"])


def test_invalid_yaml_reports_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: [unclosed\n")
    assert main(["validate", str(path), "--offline"]) == 2
    assert f"{path}:" in capsys.readouterr().err


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        load_config(write_job(tmp_path, train={"precision": "fp16"}))


def test_lora_variants_are_settings_a_sweep_can_search(tmp_path):
    from ft_ray.config import ConfigError, load_config
    from ft_ray.tune import check_search_space
    from tests.conftest import write_job

    job = write_job(tmp_path, lora={"init": "pissa", "use_rslora": True, "modules_to_save": ["lm_head"]},
                    tune={"metric": "eval_loss", "mode": "min",
                          "search_space": {"lora.use_dora": {"choice": [True, False]},
                                           "lora.init": {"choice": ["default", "olora"]}}})
    config = load_config(job)
    assert (config.lora.init, config.lora.use_rslora, config.lora.modules_to_save) == ("pissa", True, ["lm_head"])
    check_search_space(config)  # no error: both are keys of the schema with valid values
    with pytest.raises(ConfigError, match="lora.init"):
        load_config(write_job(tmp_path, "bad.yaml", lora={"init": "svd"}))


def test_a_sweep_searches_no_setting_of_the_data_it_prepares_once(tmp_path):
    """A sweep tokenizes and packs its data once, with any precomputed reference or teacher
    logits, for all its trials: a searched value that changes it is refused (the seed is not:
    every trial reads the sweep's order)."""
    from ft_ray.config import load_config
    from ft_ray.tune import check_search_space
    from tests.conftest import write_job

    def sweep(space: dict, **sections) -> None:
        check_search_space(load_config(write_job(tmp_path, tune={"search_space": space}, **sections)))

    sweep({"train.seed": {"choice": [1, 2]}, "preference.beta": {"choice": [0.1, 0.5]}}, objective="dpo",
          data={"train": "x.jsonl", "format": "preference"})
    with pytest.raises(ConfigError) as e:
        sweep({"model.max_seq_len": {"choice": [128, 256]}, "method": {"choice": ["lora", "qlora"]}},
              objective="dpo", data={"train": "x.jsonl", "format": "preference"})
    assert e.value.problems == [
        "tune.search_space.model.max_seq_len: value 256 changes the data the sweep prepares once for all its trials "
        "(tokenized and packed, with any precomputed reference or teacher logits): set it in the job, a sweep per value",
        "tune.search_space.method: value 'qlora' changes the data the sweep prepares once for all its trials "
        "(tokenized and packed, with any precomputed reference or teacher logits): set it in the job, a sweep per value"]
    sweep({"method": {"choice": ["lora", "qlora"]}}, objective="dpo", preference={"reference": "inline"},
          data={"train": "x.jsonl", "format": "preference"})  # no reference in the data
    with pytest.raises(ConfigError, match="tune.search_space.data.train: value 'y.jsonl' changes the data"):
        sweep({"data.train": {"choice": ["y.jsonl", "z.jsonl"]}}, data={"train": "x.jsonl"})
    with pytest.raises(ConfigError, match="tune.search_space.distill.top_k: value 64 changes the data"):
        sweep({"distill.top_k": {"choice": [32, 64]}}, objective="distill",
              distill={"teacher": "meta-llama/Llama-3.1-70B-Instruct", "teacher_logits": "precomputed"})


def test_an_eval_set_s_name_makes_metric_names_that_cannot_clash(tmp_path):
    config = config_from_dict({"data": {"train": "x.jsonl", "eval_sets": {"general": "g.jsonl", "code_v2": "c.jsonl"}}})
    assert [(name, key, source.path) for name, key, source in config.data.eval_set_sources()] == [
        ("general", "data.eval_sets.general", "g.jsonl"), ("code_v2", "data.eval_sets.code_v2", "c.jsonl")]
    for bad in ("General", "2nd", "a-b", "nll"):  # nll: ORPO's eval_nll_loss
        with pytest.raises(ConfigError, match=f"data.eval_sets: '{bad}' cannot name a set"):
            config_from_dict({"data": {"train": "x.jsonl", "eval_sets": {bad: "g.jsonl"}}})


def test_an_objective_names_the_formats_it_trains_on(tmp_path):
    from ft_ray.data.sources import DataError, check_format

    with pytest.raises(ConfigError, match="objective dpo trains on format preference, not instruction"):
        config_from_dict({"objective": "dpo", "data": {"train": "x.jsonl", "format": "instruction"}})
    with pytest.raises(ConfigError, match="data.loss_on: all is for objective sft or distill; objective orpo trains on its answers"):
        config_from_dict({"objective": "orpo", "data": {"train": "x.jsonl", "loss_on": "all"}})
    with pytest.raises(ConfigError, match="train.neftune_alpha: noisy embeddings are for objective sft; objective dpo"):
        config_from_dict({"objective": "dpo", "data": {"train": "x.jsonl"}, "train": {"neftune_alpha": 5}})
    with pytest.raises(ConfigError, match=r"objective dpo trains on format preference, not text \(source general.txt\)"):
        config_from_dict({"objective": "dpo", "data": {"train": "x.jsonl",
                                                       "eval_sets": {"general": {"path": "general.txt", "format": "text"}}}})
    config = config_from_dict({"objective": "kto", "preference": {"beta": 0.2}, "data": {"train": "x.jsonl"}})
    assert config.preference.beta == 0.2 and config.preference.desirable_weight == 1.0
    check_format(config, "kto", "data.train")
    with pytest.raises(DataError, match="records of format preference train with objective dpo, orpo, simpo or reward_model, not kto"):
        check_format(config, "preference", "data.train")
    with pytest.raises(DataError, match="format instruction train with objective sft, distill or grpo, not kto"):
        check_format(config, "instruction", "data.train")


def test_resume_refuses_what_changes_the_result_but_not_where_it_runs():
    old = {"train": {"learning_rate": 2e-4, "keep_checkpoints": 2}, "distributed": {"num_workers": 2},
           "lora": {"rank": 8}, "storage": {"path": "/a"}}
    new = {"train": {"learning_rate": 3e-4, "keep_checkpoints": 5},
           "distributed": {"num_workers": 4, "fsdp": {"reshard_after_forward": False}},  # how, not what
           "lora": {"rank": 16}, "storage": {"path": "/b"}}
    assert resume_changes(old, new) == ["lora.rank: 8 -> 16", "train.learning_rate: 0.0002 -> 0.0003"]
    assert resume_changes(old, old) == []
    strategy = resume_changes(old, {**old, "distributed": {"num_workers": 2, "strategy": "fsdp"}})
    assert [change.split(":")[0] for change in strategy] == ["distributed.strategy"]  # its checkpoints hold DDP's state
    # a run started before a setting existed ran as its default does
    job = config_from_dict({"data": {"train": "x.jsonl"}}).model_dump(mode="json")
    before = {**job, "data": {k: v for k, v in job["data"].items() if k != "loss_on"}}
    assert resume_changes(before, job) == []
    assert resume_changes(before, {**job, "data": {**job["data"], "loss_on": "all"}}) == [
        "data.loss_on: 'answers' -> 'all'"]
    # ... unless the default does otherwise: before model.untrained_tokens, no row was mended
    unmended = {**job, "model": {k: v for k, v in job["model"].items() if k != "untrained_tokens"}}
    assert resume_changes(unmended, job) == ["model.untrained_tokens: 'keep' -> 'mend'"]
    assert resume_changes(unmended, {**job, "model": {**job["model"], "untrained_tokens": "keep"}}) == []
    assert "untrained_tokens" not in unmended["model"]  # the saved job is left as it is
    # ... and before model.new_tokens, added tokens trained embed_tokens and lm_head whole
    added = {**job, "model": {**job["model"], "add_tokens": ["<|x|>"]}}
    older = {**added, "model": {k: v for k, v in added["model"].items() if k != "new_tokens"}}
    assert resume_changes(older, added) == ["model.new_tokens: 'whole' -> 'rows'"]


def test_local_model_folders_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray's workers do not run in the driver's directory: a model, adapter, teacher or reward
    model named by a relative folder is read from where the job was started; hub ids, built-in
    and s3:// models are left as they are."""
    monkeypatch.chdir(tmp_path)
    for name in ("base", "teacher", "rm"):
        (tmp_path / name).mkdir()
    config = load_config(write_job(tmp_path, objective="distill", model={"name_or_path": "base"},
                                   distill={"teacher": "./teacher"}))
    assert (config.model.name_or_path, config.distill.teacher) == (str(tmp_path / "base"), str(tmp_path / "teacher"))
    hub = load_config(write_job(tmp_path, name="hub.yaml", objective="distill", model={"name_or_path": "org/model"},
                                distill={"teacher": "s3://models/teacher"}))
    assert (hub.model.name_or_path, hub.distill.teacher) == ("org/model", "s3://models/teacher")
    grpo = load_config(write_job(tmp_path, name="grpo.yaml", objective="grpo",
                                 grpo={"rewards": {"model:rm": 1.0, "model:org/rm": 1.0, "chrf": 1.0}}))
    assert grpo.grpo.rewards == {f"model:{tmp_path / 'rm'}": 1.0, "model:org/rm": 1.0, "chrf": 1.0}
    assert load_config(write_job(tmp_path, name="builtin.yaml")).model.name_or_path == "builtin:tiny-llama"


@pytest.mark.parametrize("settings, zero3, fsdp", [
    ({}, True, True),
    ({"method": "lora"}, True, True),
    ({"distributed": {"deepspeed": {"stage": 3, "zero3_init": False}}}, False, True),
    ({"distributed": {"deepspeed": {"stage": 2}}}, False, True),
    ({"method": "qlora", "quantization": {"quant_storage": "bfloat16"}}, False, False),  # 4-bit layers load whole
    ({"method": "lora", "lora": {"init": "pissa"}}, True, True),  # from the weights: gathered (ZeRO-3), rank 0's (fsdp)
    ({"method": "lora", "model": {"adapter": "/runs/a/adapter"}}, True, True),
    ({"method": "lora", "lora": {"modules_to_save": ["lm_head"]}}, True, True),  # PEFT copies a module trained whole
    ({"method": "lora", "objective": "reward_model"}, True, True),  # its new score head
    ({"objective": "reward_model"}, True, True),
    ({"method": "lora", "model": {"add_tokens": ["<x>"], "new_tokens": "whole"}}, True, True),
    ({"method": "lora", "model": {"add_tokens": ["<x>"], "new_tokens": "rows"}}, True, True),
    ({"model": {"add_tokens": ["<x>"], "new_tokens": "whole"}}, True, True),  # a full fine-tune trains them anyway
])
def test_sharded_jobs_read_the_weights_on_rank0_where_no_worker_needs_them_whole(settings, zero3, fsdp):
    """distributed.deepspeed.zero3_init (Accelerate's zero3_init_flag): the models of a ZeRO-3
    job are built partitioned, rank 0 alone reading their weights; fsdp's
    cpu_ram_efficient_loading: rank 0 alone reads them, the others build empty. Not for QLoRA
    (4-bit layers load whole on every worker)."""
    raw = {"method": "full", "data": {"train": "t.jsonl"}, **settings,
           "distributed": {"strategy": "deepspeed", "deepspeed": {"stage": 3}, **settings.get("distributed", {})}}
    assert config_from_dict(raw).partitions_at_load is zero3
    assert config_from_dict({**raw, "distributed": {**raw["distributed"], "strategy": "fsdp"}}).loads_on_rank0 is fsdp


def test_zero3_init_flag_is_ft_rays_zero3_init(tmp_path):
    with pytest.raises(ConfigError, match=r"ft-ray's key: 'distributed.deepspeed.zero3_init'"):
        load_config(write_job(tmp_path, distributed={"zero3_init_flag": False}))
