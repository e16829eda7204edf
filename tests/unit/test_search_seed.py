"""`tune.seed`: the same sweep file samples the same trials (random, grid and Optuna search);
`seed: null` draws new ones."""

from __future__ import annotations

import pytest
from ray.tune.registry import register_trainable

from ft_ray.config import TuneConfig
from ft_ray.tune import _search_alg, param_space

SPACE = {"lora.rank": {"choice": [8, 16, 32]}, "train.learning_rate": {"loguniform": [5e-4, 1e-2]}}


def sampled(search_alg: str, seed: int | None, samples: int = 4) -> list[dict]:
    space = SPACE if search_alg != "grid" else {"lora.rank": {"grid": [8, 16]},
                                                "train.learning_rate": {"loguniform": [5e-4, 1e-2]}}
    if search_alg == "grid":
        search_alg = "random"  # grid points x random draws of the other keys: Tune's basic generator
    tune = TuneConfig.model_validate({"num_samples": samples, "seed": seed, "search_alg": search_alg,
                                      "search_space": space})
    alg = _search_alg(tune, samples * 2)
    if search_alg == "optuna":
        alg.set_search_properties("eval_loss", "min", param_space(tune))
        return [alg.suggest(f"trial-{i}") for i in range(samples)]
    register_trainable("sampled", lambda config: None)
    alg.add_configurations({"sweep": {"run": "sampled", "config": param_space(tune), "num_samples": samples}})
    trials = []
    while (trial := alg.next_trial()) is not None:
        trials.append(trial.config)
    return trials


@pytest.mark.parametrize("search_alg", ["random", "grid", "optuna"])
def test_the_same_seed_samples_the_same_trials(search_alg):
    first = sampled(search_alg, 0)
    assert len(first) == (8 if search_alg == "grid" else 4)
    assert sampled(search_alg, 0) == first
    assert sampled(search_alg, 1) != first
    assert len({t["train.learning_rate"] for t in first}) == len(first)  # real draws, not one value repeated


def test_no_seed_draws_new_trials_each_time():
    assert sampled("random", None) != sampled("random", None)
