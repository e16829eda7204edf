"""Ranking a sweep's trials on its metric, including one other than the eval loss."""

from types import SimpleNamespace

from ft_ray.config import StorageConfig, config_from_dict
from ft_ray.storage import RunFolder
from ft_ray.winners import ranked, trial_records


def test_trials_are_ranked_on_a_preference_sweeps_reward_accuracy(tmp_path):
    config = config_from_dict({"run_name": "pref", "objective": "dpo", "data": {"train": "x.jsonl"},
                               "tune": {"metric": "eval_reward_accuracy", "mode": "max"}})
    results = [SimpleNamespace(metrics={"trial_id": trial, "step": 10, "eval_loss": loss, "eval_reward_accuracy": acc,
                                        "train_tokens": 100}, path=f"/x/run_{trial}_0", config={"preference.beta": b},
                               error=None)
               for trial, loss, acc, b in (("a", 0.2, 0.8, 0.1), ("b", 0.3, 0.95, 0.5), ("c", 0.1, 0.9, 0.2))]
    sweep = RunFolder.at(str(tmp_path / "pref"), StorageConfig())
    records = trial_records(config, sweep, results)
    assert records[0]["metrics"] == {"eval_loss": 0.2, "train_tokens": 100, "eval_reward_accuracy": 0.8}
    assert [r["trial"] for r in ranked(records, config.tune)] == ["pref-b", "pref-c", "pref-a"]
