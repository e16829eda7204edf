"""What an evaluation measures, as plain functions (no model, no Ray): answer scores, the
rewards of a GRPO run (built in or the job's own), the paired bootstrap interval and the
verdict sentence. Unit-tested on hand-made cases.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np

from ft_ray.config import InputError, StorageConfig

LOWER_IS_BETTER = {"loss"}
METRIC_WORDS = {"loss": "loss", "exact_match": "exact match", "chrf": "chrF", "format": "format adherence",
                "preference": "preference accuracy", "reward": "reward", "pair_accuracy": "pair accuracy"}


def normalize(text: str) -> str:
    """Whitespace runs as one space, no leading or trailing space."""
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer is the reference, up to whitespace."""
    return float(normalize(answer) == normalize(reference))


def chrf(answer: str, reference: str) -> float:
    """Character n-gram F-score (chrF, sacrebleu) in [0, 1]: how much of the reference's
    wording the answer has, tolerant of small differences."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(answer, [reference]).score / 100.0


def in_format(answer: str, pattern: str) -> float:
    """1.0 when the regex matches the whole (stripped) answer."""
    return float(re.fullmatch(pattern, answer.strip()) is not None)


def cut_at_next_example(answer: str, prompt: str) -> str:
    """The answer up to where the model starts another example of its own (the first line of
    the prompt appears again): few-shot prompting teaches a base model to go on that way."""
    header = next((line.strip() for line in prompt.splitlines() if line.strip()), "")
    if header and header in answer:
        answer = answer[: answer.index(header)]
    return answer.strip()


def final_answer(answer: str, reasoning_end: str | None) -> str:
    """The answer after its reasoning block (what exact match and chrF compare): the text after
    `reasoning_end` ("</think>"), empty where the block never closed; `answer` as it is
    without a reasoning template."""
    if reasoning_end is None:
        return answer
    if reasoning_end in answer:
        return answer.split(reasoning_end, 1)[1].strip()
    return "" if answer.lstrip().startswith(reasoning_end.replace("</", "<", 1)) else answer


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total else math.nan


def paired_bootstrap(ours: Sequence[float], theirs: Sequence[float], weights: Sequence[float] | None = None,
                     samples: int = 1000, seed: int = 0, lower_is_better: bool = False,
                     chunk: int = 100) -> tuple[float, float, float]:
    """(difference, low, high): how much better `ours` is than `theirs` (positive = ours
    better) on the same examples, and the 95% percentile interval of that difference over
    `samples` resamples of the examples (the same resample for both, hence paired).

    With `weights` the statistic is the weighted mean (loss per target token: values are
    per-example mean losses, weights their token counts). The same seed gives the same
    interval.
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (len(a) == len(b) == len(w)) or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs equally long, non-empty inputs (got {len(a)}, {len(b)}, {len(w)})")
    sign = -1.0 if lower_is_better else 1.0
    difference = sign * (weighted_mean(a, w) - weighted_mean(b, w))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, samples, chunk):  # chunks keep the index matrix small for large eval sets
        idx = rng.integers(0, len(a), size=(min(chunk, samples - start), len(a)))
        ws = w[idx]
        totals = np.where(ws.sum(axis=1) > 0, ws.sum(axis=1), 1.0)
        diffs.append(sign * (((a[idx] - b[idx]) * ws).sum(axis=1) / totals))
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return difference, float(low), float(high)


def verdict(metric: str, variant: float, other: float, difference: float, low: float, high: float,
            other_name: str, not_paying: str = "fine-tuning does not pay here") -> dict[str, Any]:
    """The decision in one sentence: does the variant beat `other_name` (e.g. "3-shot
    prompting") beyond noise (else the sentence ends with `not_paying`, where there is one)?
    `difference` and the interval are the variant's advantage."""
    word = METRIC_WORDS[metric]
    figures = (f"{word} {variant:.3g} vs {other:.3g}, 95% CI of the difference [{low:.3g}, {high:.3g}]")
    short = f": {not_paying}" if not_paying else ""
    if low > 0:
        outcome, sentence = "variant_better", f"the variant beats {other_name}: {figures}"
    elif high < 0:
        outcome, sentence = "other_better", f"{other_name} beats the variant: {figures}{short}"
    else:
        outcome, sentence = "within_noise", f"{other_name} is within noise of the variant: {figures}{short}"
    return {"metric": metric, "against": other_name, "variant": variant, "other": other,
            "difference": difference, "ci95": [low, high], "outcome": outcome,
            "fine_tuning_pays": outcome == "variant_better", "sentence": sentence}


Scorer = Callable[[list[str], list[str], list[str]], list[float]]  # (answers, references, prompts) -> rewards
BATCH_ARGUMENTS = ("prompts", "completions", "reference")  # what a batched (TRL-style) reward is given


def reward_function(rewards: dict[str, float], format_regex: str | None,
                    storage: StorageConfig | None = None) -> Scorer:
    """(answers, references, prompts) -> the weighted sum of `grpo.rewards` for each answer.

    A reward is called once per answer as `function(answer, reference, prompt)`, or, where it
    takes a `completions` argument (TRL's reward functions, and a reward model's scorer:
    `reward_model.model_reward`), once per batch as `function(prompts=[...],
    completions=[...], reference=[...])` (those its signature takes), returning one number per
    answer or None (TRL's "not scored": adds nothing). A reward model in an s3:// folder is
    read with `storage` (the job's storage section).

    Raises:
        InputError: a module:function reward that cannot be imported here, or a batched one
            that needs an argument it is not given.
    """
    from ft_ray.evaluation.reward_model import REWARD_MODEL, model_reward

    builtin = {"chrf": lambda answer, reference, _: chrf(answer, reference),
               "exact": lambda answer, reference, _: exact_match(answer, reference),
               "format": lambda answer, _, __: in_format(answer, format_regex) if format_regex else 0.0}
    scores = {name: builtin.get(name) or (model_reward(name, storage) if name.startswith(REWARD_MODEL)
                                          else user_reward(name)) for name in rewards}
    batched = {name: batch_arguments(name, function) for name, function in scores.items() if name not in builtin}
    batched = {name: taken for name, taken in batched.items() if taken is not None}

    def reward(answers: list[str], references: list[str], prompts: list[str]) -> list[float]:
        totals = [0.0] * len(answers)
        for name, weight in rewards.items():
            if name in batched:
                given = {"prompts": list(prompts), "completions": list(answers), "reference": list(references)}
                values = scores[name](**{key: given[key] for key in batched[name]})
                if not isinstance(values, Sequence | np.ndarray) or len(values) != len(answers):
                    raise TypeError(f"grpo.rewards: {name} returned {type(values).__name__} "
                                    f"{_shown(values)}, not a list of {len(answers)} numbers (one per completion)")
            else:
                values = [scores[name](*row) for row in zip(answers, references, prompts)]
            for i, value in enumerate(values):
                if value is None and name in batched:
                    continue
                if not isinstance(value, numbers.Real):  # bool, int, float, numpy's floats
                    raise TypeError(f"grpo.rewards: {name} returned {value!r} ({type(value).__name__}), not a number")
                totals[i] += weight * float(value)
        return totals

    return reward


def check_rewards(rewards: dict[str, float], storage: StorageConfig | None = None) -> None:
    """What a driver checks of `grpo.rewards` before a run, as each worker will load them:
    its own functions import (and a batched one takes what it is given); a reward model's
    config is there and names a sequence classifier (its weights are not loaded here).

    Raises:
        InputError: a reward that is not there or cannot be called.
    """
    from ft_ray.evaluation.reward_model import REWARD_MODEL, check_reward_model

    for name in rewards:
        if name.startswith(REWARD_MODEL):
            check_reward_model(name, storage)
        elif ":" in name:
            batch_arguments(name, user_reward(name))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def batch_arguments(name: str, function: Callable) -> tuple[str, ...] | None:
    """The arguments a batched reward (one taking `completions`) is given: those of
    BATCH_ARGUMENTS it takes (all where it takes **kwargs); None for a reward called once per
    answer.

    Raises:
        InputError: it needs an argument that is not given.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called per answer
        return None
    if "completions" not in parameters:
        return None
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    needed = [key for key, p in parameters.items() if p.default is inspect.Parameter.empty
              and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
              and key not in BATCH_ARGUMENTS]
    if needed:
        raise InputError(f"grpo.rewards: {name} takes completions (called once per batch) but also needs "
                         f"{', '.join(needed)}; a batched reward is given {', '.join(BATCH_ARGUMENTS)} only "
                         "(reference: each record's answer)")
    return tuple(key for key in BATCH_ARGUMENTS if takes_all or key in parameters)


def user_reward(name: str) -> Callable[..., Any]:
    """The function `module:function` names (a module on the workers' path: the job's folder,
    which Ray puts there, or an installed package).

    Raises:
        InputError: it cannot be imported, or is not a function.
    """
    module_name, function = name.split(":")
    if os.getcwd() not in sys.path:  # the job's folder, as Ray puts the driver's on its workers' path
        sys.path.append(os.getcwd())
    try:
        found = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise InputError(f"grpo.rewards: cannot import {name} ({type(e).__name__}: {e}): a reward function must be "
                         "importable where the job runs (a module of the job's folder or an installed package)") from None
    if not callable(found):
        raise InputError(f"grpo.rewards: {name} is a {type(found).__name__}, not a function")
    return found
