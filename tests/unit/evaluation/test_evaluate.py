"""What `ft-ray eval` takes to evaluate, without Ray: a run trained on another base model
than the evaluating job's is refused before any model loads."""

import json

import pytest

from ft_ray.config import InputError, config_from_dict, dump_yaml
from ft_ray.evaluation.evaluate import resolve_target


def test_a_run_trained_on_another_model_is_refused_naming_the_keys(tmp_path):
    job = {"data": {"train": "unused.jsonl"}, "storage": {"path": str(tmp_path)}}
    trained = config_from_dict({**job, "model": {"name_or_path": str(tmp_path / "my-base")}, "method": "qlora"})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(trained))
    (run / "summary.json").write_text(json.dumps({"adapter_path": str(run / "adapter")}))
    with pytest.raises(InputError) as caught:
        with resolve_target(str(run), config_from_dict(job)):
            pass
    assert str(caught.value) == (
        f"{run} was trained with another model than this job's (method: 'qlora' there, 'lora' here; "
        f"model.name_or_path: '{tmp_path / 'my-base'}' there, 'builtin:tiny-llama' here): "
        "evaluate it with the job file it was trained with (its config.yaml)")
    same = config_from_dict({**job, "model": {"name_or_path": str(tmp_path / "my-base")}, "method": "qlora",
                             "train": {"learning_rate": 0.1}})  # what the run learnt with may differ
    with resolve_target(str(run), same) as target:
        assert target.weights == str(run / "adapter")


def test_a_distillation_run_is_evaluated_against_the_teacher_it_learnt_from(tmp_path):
    """Its teacher arm must be its teacher; a job without one (objective sft) evaluates it without that arm."""
    job = {"data": {"train": "unused.jsonl"}, "storage": {"path": str(tmp_path)}}
    taught = {**job, "objective": "distill", "distill": {"teacher": "org/big"}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(config_from_dict(taught)))
    (run / "summary.json").write_text(json.dumps({"adapter_path": str(run / "adapter")}))
    with pytest.raises(InputError, match="distill.teacher: 'org/big' there, 'org/other' here"):
        with resolve_target(str(run), config_from_dict({**taught, "distill": {"teacher": "org/other"}})):
            pass
    for same in (taught, job):
        with resolve_target(str(run), config_from_dict(same)) as target:
            assert target.weights == str(run / "adapter")
