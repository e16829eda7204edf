"""`ft-ray eval` through Ray Data on the local Ray: an eval set of many blocks is sharded over
two model actors, and eval.json says what a user needs to decide."""

from __future__ import annotations

import json

import pytest

from ft_ray.cli import main
from ft_ray.config import ModelConfig
from ft_ray.models import save_base_model
from tests.conftest import DEMO, write_job

pytestmark = [pytest.mark.integration]


def test_an_eval_set_of_many_blocks_is_scored_by_two_actors(ray_local, tmp_path, capsys):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    eval_lines = DEMO.joinpath("eval.jsonl").read_text().splitlines(keepends=True)
    # 2 of the training records are held-out records too (one with its keys in another order)
    reordered = json.dumps(dict(reversed(list(json.loads(eval_lines[5]).items())))) + "\n"
    train.write_text("".join(DEMO.joinpath("train.jsonl").read_text().splitlines(keepends=True)[:50]
                             + [eval_lines[0], reordered]))
    held_out.write_text("".join(eval_lines) * 4 + "{broken\n")  # 192 good records, 1 bad
    # the "variant" is a copy of the base model: it must come out level with the base arm
    variant = save_base_model(ModelConfig(), tmp_path / "variant")
    job = write_job(tmp_path, data={"train": str(train), "eval": str(held_out)}, model={"max_seq_len": 512},
                    eval={"batch_size": 4, "num_actors": 2, "num_generations": 3, "max_new_tokens": 16})
    assert main(["eval", str(job), "--run", str(variant)]) == 0
    out = capsys.readouterr().out
    result = json.loads((variant / "eval.json").read_text())
    assert result["examples"] == 192 and result["skipped"] == {"not_json": 1} and result["generated"] == 3
    assert len(result["actors_used"]) == 2  # 4 records per batch, 16 per block: both actors got blocks
    assert result["train_examples"] == 52
    assert any("52 examples (< 100)" in w for w in result["warnings"])
    assert result["held_out_in_training"] == 8  # each of the 2 is 4 times in the held-out set
    assert "warning: 8 of the held-out records are training records too" in out
    assert result["vs_base"]["outcome"] == "within_noise" and result["vs_base"]["difference"] == pytest.approx(0, abs=1e-6)
    assert result["arms"]["variant"]["loss"] == pytest.approx(result["arms"]["base"]["loss"], rel=1e-5)
    for arm in ("few_shot", "retrieval"):  # 3 examples before each prompt, from 52 training records for retrieval
        prompting = result["arms"][arm]
        assert prompting["shots_mean"] == 3 and prompting["prompt_tokens_mean"] > 3 * result["arms"]["base"]["prompt_tokens_mean"]
    assert result["verdict"]["strongest_prompting_arm"] in ("few_shot", "retrieval") and "retrieval" in result["comparisons"]
    assert "retrieval from 52 training examples" in out and result["retrieval_pool"] == 52
    assert [s["key"].rsplit(":", 1)[1] for s in result["samples"]] == ["1", "2", "3"]  # the first held-out records
    assert result["verdict"]["sentence"] in out and "warning: the training set has 52 examples" in out


def test_eval_without_weights_says_what_it_expected(ray_local, tmp_path, capsys):
    job = write_job(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(job), "--run", str(tmp_path / "empty")]) == 2
    assert "not a run folder (summary.json), a sweep winner (winner.json)" in capsys.readouterr().err
    assert main(["eval", str(job), "--run", str(tmp_path / "misspelt")]) == 2
    assert f"{tmp_path / 'misspelt'}: nothing there (a run folder, sweep winner" in capsys.readouterr().err
