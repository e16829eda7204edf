"""`ft-ray eval` of a reward model, without Ray: each answer scored as training scores it (the
model's own score of the assembled prompt + answer, alone or padded in a batch), records that
are no pair set aside with the reason, and the verdict against the longer answer by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ft_ray.config import config_from_dict
from ft_ray.data.formats import record_segments
from ft_ray.data.tokenize import assemble, bos_id, encode_batch
from ft_ray.evaluation.pairs import PairScorer, summarize_pairs
from ft_ray.models import ASSETS, load_tokenizer

DEMO = ASSETS / "demo" / "preference-eval.jsonl"


def test_each_answer_is_scored_at_its_last_token_as_the_model_scores_it_alone(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tests.conftest import tiny_reward_model

    folder = tiny_reward_model(tmp_path / "rm")  # a full reward model, its score head seeded
    job = config_from_dict({"objective": "reward_model", "method": "full", "data": {"train": "t.jsonl"},
                            "model": {"max_seq_len": 512}, "eval": {"batch_size": 4}})
    scorer = PairScorer(job.model_dump_json(), str(folder), "preference", {})
    records = DEMO.read_text().splitlines()[:3]
    batch = {"text": np.array([*records, json.dumps({"instruction": "a", "output": "b"})], dtype=object),
             "error": np.array([""] * 4, dtype=object), "path": np.array(["eval.jsonl"] * 4, dtype=object),
             "line": np.arange(1, 5)}
    rows = scorer(batch)
    assert rows["reason"] == ["", "", "", "missing_field"] and np.isnan(rows["chosen_score"][3])
    tokenizer = load_tokenizer(job.model)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for i, text in enumerate(records):
        record = json.loads(text)
        for side in ("chosen", "rejected"):
            segments = record_segments({**record, "output": record[side]}, "instruction", tokenizer)
            ids = assemble(encode_batch(tokenizer, [t for t, _ in segments]), [t for _, t in segments],
                           bos_id(tokenizer), 512)["input_ids"]
            assert ids[-1] == tokenizer.eos_token_id  # scored where training reads the score: the answer's eos
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert rows[f"{side}_score"][i] == pytest.approx(alone, abs=1e-4), (i, side)  # padded among others
            assert rows[f"{side}_tokens"][i] == len(encode_batch(tokenizer, [segments[-1][0]])[0])
            assert rows[f"{side}_text"][i] == segments[-1][0]
        assert rows["prompt"][i] == "".join(t for t, trained in segments if not trained)


def test_the_verdict_against_the_longer_answer_by_hand():
    job = config_from_dict({"objective": "reward_model", "data": {"train": "t.jsonl"}})
    n = 40
    # the model orders 36 of 40 pairs (and ties one: half a point); the longer answer is chosen in 20
    chosen = np.array([1.0] * 36 + [0.0, 0.0, 0.0, 0.5])
    rejected = np.array([0.0] * 36 + [1.0, 1.0, 1.0, 0.5])
    cols = {"key": np.array([f"e:{i}" for i in range(n + 1)]), "reason": np.array([""] * n + ["not_json"]),
            "prompt": np.array(["p"] * (n + 1)), "chosen_text": np.array(["c"] * (n + 1)),
            "rejected_text": np.array(["r"] * (n + 1)),
            "chosen_score": np.append(chosen, np.nan), "rejected_score": np.append(rejected, np.nan),
            "chosen_tokens": np.array([10, 5] * (n // 2) + [0]), "rejected_tokens": np.array([5, 10] * (n // 2) + [0])}
    result = summarize_pairs(job, cols)
    assert result["examples"] == 40 and result["not_scored"] == {"not_json": 1}
    assert result["arms"]["variant"]["pair_accuracy"] == pytest.approx(36.5 / 40)
    assert result["arms"]["longer_answer"]["pair_accuracy"] == pytest.approx(0.5)
    assert result["arms"]["variant"]["mean_margin"] == pytest.approx((36 - 3) / 40)
    verdict = result["verdict"]
    assert verdict["outcome"] == "variant_better" and verdict["difference"] == pytest.approx(36.5 / 40 - 0.5)
    assert verdict["sentence"].startswith("the reward model orders the held-out pairs better than the longer answer")
    assert [p["key"] for p in result["worst_pairs"][:3]] == ["e:36", "e:37", "e:38"]
    # a model that scores by length: no better than the rule
    by_length = {**cols, "chosen_score": cols["chosen_tokens"].astype(float),
                 "rejected_score": cols["rejected_tokens"].astype(float)}
    same = summarize_pairs(job, by_length)["verdict"]
    assert same["outcome"] == "within_noise" and same["difference"] == 0
    assert "it may have learned length rather than the preference" in same["sentence"]


def test_a_grpo_reward_model_scores_an_answer_as_training_and_eval_do(tmp_path):
    """`grpo.rewards: {"model:<folder>": 1}` scores prompt + answer + eos: the score a reward
    model read at the answer's eos in training, and `ft-ray eval` reads there too."""
    from ft_ray.evaluation.metrics import reward_function
    from tests.conftest import tiny_reward_model

    folder = tiny_reward_model(tmp_path / "rm")
    job = config_from_dict({"objective": "reward_model", "method": "full", "data": {"train": "t.jsonl"},
                            "model": {"max_seq_len": 512}})
    records = DEMO.read_text().splitlines()[:4]
    batch = {"text": np.array(records, dtype=object), "error": np.array([""] * 4, dtype=object),
             "path": np.array(["eval.jsonl"] * 4, dtype=object), "line": np.arange(1, 5)}
    rows = PairScorer(job.model_dump_json(), str(folder), "preference", {})(batch)
    reward = reward_function({f"model:{folder}": 1.0}, None)
    scored = reward(rows["chosen_text"] + rows["rejected_text"], [""] * 8, rows["prompt"] * 2)
    assert scored == pytest.approx(rows["chosen_score"] + rows["rejected_score"], abs=1e-4)
