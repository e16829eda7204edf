"""The driver's decisions made before Ray starts: how many optimizer steps a run has."""

import pytest

from ft_ray.config import config_from_dict
from ft_ray.data.sources import DataError
from ft_ray.train.trainer import plan_steps


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
