"""eval.json from per-example figures: arm figures, cost per request, skipped records,
warnings, verdicts (against the strongest prompting arm)."""

from __future__ import annotations

import numpy as np
import pytest

from ft_ray.config import InputError, config_from_dict
from ft_ray.evaluation.evaluate import summarize
from ft_ray.evaluation.arms import ARM_NAMES

AVAILABLE = {"few_shot": 3, "retrieval": 500}


def columns(n: int, losses: dict[str, float], shots: int = 3) -> dict[str, np.ndarray]:
    losses = {"retrieval": losses["few_shot"] + 0.5, **losses}  # retrieval: worse than few-shot unless given
    cols = {"key": np.array([f"f:{i}" for i in range(n)]), "reason": np.array([""] * n, dtype=object),
            "context": np.full(n, 4096), "generated": np.arange(n) < 2, "actor": np.array(["a"] * n),
            "prompt": np.array(["p"] * n), "reference": np.array(["r"] * n)}
    rng = np.random.default_rng(0)
    for arm in ARM_NAMES:
        tokens = np.full(n, 10)
        prompting = arm in ("few_shot", "retrieval")
        cols |= {f"{arm}_tokens": tokens, f"{arm}_loss_sum": (losses[arm] + rng.normal(0, 0.01, n)) * tokens,
                 f"{arm}_prompt_tokens": np.full(n, 30 if prompting else 10), f"{arm}_shots": np.full(n, shots * prompting),
                 f"{arm}_answer": np.array(["r"] * n), f"{arm}_gen_tokens": np.full(n, 5),
                 f"{arm}_gen_s": np.full(n, 0.5), f"{arm}_exact": np.ones(n), f"{arm}_chrf": np.ones(n),
                 f"{arm}_format": np.full(n, np.nan)}
    return cols


def config(**eval_settings):
    return config_from_dict({"data": {"train": "t.jsonl"}, "eval": eval_settings})


def test_a_better_variant_wins_and_every_figure_is_there():
    cols = columns(40, {"base": 3.0, "few_shot": 2.0, "variant": 1.0})
    cols["reason"][0] = "not_json"
    result = summarize(config(), cols, AVAILABLE, train_examples=500)
    assert result["examples"] == 39 and result["skipped"] == {"not_json": 1} and result["generated"] == 1
    few = result["arms"]["few_shot"]
    assert few["loss"] == pytest.approx(2.0, abs=0.01) and few["perplexity"] == pytest.approx(np.exp(few["loss"]))
    assert few["prompt_tokens_mean"] == 30 and few["shots_mean"] == 3 and few["generation_tokens_per_s"] == 10
    assert result["arms"]["variant"]["format"] is None  # no eval.format_regex
    assert result["verdict"]["outcome"] == "variant_better"
    assert result["verdict"]["sentence"].startswith("the variant beats 3-shot prompting: loss ")
    assert result["vs_base"]["outcome"] == "variant_better"
    assert result["warnings"] == []


def test_few_training_examples_and_shots_that_did_not_fit_are_warned_about():
    cols = columns(30, {"base": 2.0, "few_shot": 1.0, "variant": 1.0}, shots=1)
    result = summarize(config(), cols, AVAILABLE, train_examples=40)
    assert any("40 examples (< 100)" in w for w in result["warnings"])
    assert any("1 examples fitted on average" in w for w in result["warnings"])
    assert result["verdict"]["outcome"] == "within_noise"
    assert "few-shot prompting (1 of 3 examples fitted on average) is within noise" in result["verdict"]["sentence"]


def test_a_generation_metric_decides_on_the_generated_examples_only():
    cols = columns(30, {"base": 2.0, "few_shot": 1.0, "variant": 1.0})
    cols["few_shot_exact"][:] = cols["retrieval_exact"][:] = 0.0
    result = summarize(config(metric="exact_match"), cols, AVAILABLE, train_examples=500)
    assert result["verdict"]["metric"] == "exact_match"
    assert result["verdict"]["variant"] == 1.0 and result["verdict"]["other"] == 0.0
    with pytest.raises(InputError, match="could be scored"):
        cols["reason"][:] = "not_json"
        summarize(config(), cols, AVAILABLE, train_examples=500)


def test_the_preference_metric_counts_pairs_whose_chosen_answer_is_likelier_per_token():
    cols = columns(40, {"base": 2.0, "few_shot": 2.0, "variant": 1.0})
    for arm, rejected_loss in (("base", 1.5), ("few_shot", 1.5), ("retrieval", 1.5), ("variant", 3.0)):
        cols[f"{arm}_rejected_tokens"] = np.full(40, 20)  # per token, not per answer: 20 tokens, not 10
        cols[f"{arm}_rejected_loss_sum"] = np.full(40, rejected_loss * 20)
    cols["variant_rejected_loss_sum"][:4] = 0.5 * 20  # 4 pairs where the variant still prefers the rejected answer
    job = config_from_dict({"objective": "dpo", "data": {"train": "t.jsonl"}, "eval": {"metric": "preference"}})
    result = summarize(job, cols, AVAILABLE, train_examples=500)
    assert result["arms"]["variant"]["preference_accuracy"] == pytest.approx(0.9)
    assert result["arms"]["base"]["preference_accuracy"] == 0.0
    assert result["verdict"]["metric"] == "preference" and result["verdict"]["outcome"] == "variant_better"
    assert result["verdict"]["sentence"].startswith("the variant beats 3-shot prompting: preference accuracy 0.9 vs 0")
    with pytest.raises(Exception, match="eval.metric: preference is measured on chosen/rejected pairs"):
        config(metric="preference")


def test_the_verdict_is_against_the_strongest_prompting_arm_and_every_comparison_is_kept():
    cols = columns(40, {"base": 3.0, "few_shot": 2.5, "retrieval": 1.5, "variant": 1.0})
    result = summarize(config(), cols, AVAILABLE, train_examples=500)
    assert result["verdict"]["strongest_prompting_arm"] == "retrieval"
    assert result["verdict"]["sentence"].startswith("the variant beats retrieval 3-shot prompting: loss ")
    assert set(result["comparisons"]) == {"base", "few_shot", "retrieval"}
    assert result["comparisons"]["few_shot"]["against"] == "3-shot prompting"
    assert result["vs_base"] == result["comparisons"]["base"]
    assert result["arms"]["retrieval"]["shots_mean"] == 3 and result["arms"]["retrieval"]["context_tokens"] == 4096


def test_cost_per_request_adds_up():
    # prompts: 10 tokens plain, 30 with examples; 5 tokens generated by every arm
    cols = columns(40, {"base": 3.0, "few_shot": 2.0, "variant": 1.0})
    relative = summarize(config(), cols, AVAILABLE, train_examples=500)
    assert relative["arms"]["variant"]["tokens_per_request"] == 15 and relative["arms"]["retrieval"]["tokens_per_request"] == 35
    assert relative["arms"]["few_shot"]["cost_relative_to_variant"] == pytest.approx(35 / 15, abs=1e-3)
    assert relative["verdict"]["tokens_per_request_ratio"] == pytest.approx(15 / 35, abs=1e-3)
    assert relative["verdict"]["sentence"].endswith("the variant sends 0.43x the tokens per request")
    priced = summarize(config(price_per_million_tokens=2.0), cols, AVAILABLE, train_examples=500)
    assert priced["arms"]["variant"]["cost_per_1000_requests"] == pytest.approx(1000 * 15 * 2.0 / 1e6)
    assert priced["arms"]["few_shot"]["cost_per_1000_requests"] == pytest.approx(1000 * 35 * 2.0 / 1e6)


def test_a_distillation_run_is_set_against_its_teacher_and_says_how_far_it_came():
    """The teacher arm (objective distill) is compared with the variant like the base model is,
    its sentence without "fine-tuning does not pay" (the teacher is expected to lead), and
    eval.json says how much of the way from the base model to the teacher the variant went."""
    cols = columns(40, {"base": 3.0, "few_shot": 2.5, "variant": 1.5})
    rng = np.random.default_rng(1)
    cols |= {key.replace("variant_", "teacher_"): value.copy() for key, value in cols.items()
             if key.startswith("variant_")}
    cols["teacher_loss_sum"] = (1.0 + rng.normal(0, 0.01, 40)) * cols["teacher_tokens"]
    job = config_from_dict({"objective": "distill", "distill": {"teacher": "teacher"}, "data": {"train": "t.jsonl"}})
    result = summarize(job, cols, AVAILABLE, train_examples=500)
    teacher = result["comparisons"]["teacher"]
    assert teacher["outcome"] == "other_better" and teacher["other"] == pytest.approx(1.0, abs=0.01)
    assert teacher["sentence"].startswith("the teacher beats the variant: loss 1.5 vs 1, 95% CI")
    assert "does not pay" not in teacher["sentence"] and result["verdict"]["outcome"] == "variant_better"
    assert result["teacher_gap_closed"] == pytest.approx((1.5 - 3.0) / (1.0 - 3.0), abs=0.02)  # 3/4 of the way
    assert result["arms"]["teacher"]["loss"] == pytest.approx(1.0, abs=0.01)
    assert "teacher" not in summarize(config(), columns(40, {"base": 3.0, "few_shot": 2.5, "variant": 1.5}),
                                      AVAILABLE, train_examples=500)["comparisons"]
