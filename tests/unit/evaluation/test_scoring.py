"""The arms on raw records, with the built-in model (no Ray): prompt token counts, how many
shots fit, which examples retrieval puts before a prompt, target-token losses and scored
answers, checked by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ft_ray.config import config_from_dict
from ft_ray.data.formats import record_segments
from ft_ray.evaluation import metrics
from ft_ray.evaluation.scoring import ArmScorer, record_key, shot_text
from ft_ray.models import ASSETS, load_base_model, load_tokenizer

RECORD = {"instruction": "Reply in the house style.", "input": "From Ben: my tent is torn.",
          "output": "Hi Ben, thanks for writing.\nWarmly, the Northwind team"}
SHOTS = [{"instruction": "Reply in the house style.", "input": f"From {name}: where is my order?",
          "output": f"Hi {name}, thanks for writing.\nWarmly, the Northwind team"} for name in ("Ana", "Dev", "Kim")]


def scorer(max_seq_len: int, regex: str | None = None, context: int | None = None) -> ArmScorer:
    job = config_from_dict({"model": {"max_seq_len": max_seq_len}, "data": {"train": "unused.jsonl"},
                            "eval": {"few_shot": 3, "max_new_tokens": 12, "format_regex": regex,
                                     "max_prompt_tokens": context}})
    tokenizer = load_tokenizer(job.model)
    shots = [shot_text(record_segments(s, "instruction", tokenizer), tokenizer.eos_token) for s in SHOTS]
    # the variant is the base model itself: the variant and base arms must agree exactly
    return ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), shots, "instruction", {},
                     generate_keys=[record_key("eval.jsonl", 1)])


def score(s: ArmScorer, *texts: str) -> list[dict]:
    batch = {"text": np.array(texts, dtype=object), "error": np.array([""] * len(texts), dtype=object),
             "path": np.array(["eval.jsonl"] * len(texts), dtype=object), "line": np.arange(1, len(texts) + 1)}
    rows = s(batch)
    return [{k: v[i] for k, v in rows.items()} for i in range(len(texts))]


def test_prompt_tokens_and_fitted_shots_are_counted_by_hand():
    tokenizer = load_tokenizer(config_from_dict({"data": {"train": "x"}}).model)
    segments = record_segments(RECORD, "instruction", tokenizer)
    prompt_len = len(tokenizer(segments[0][0], add_special_tokens=False).input_ids)
    example_len = 1 + sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t, _ in segments)
    shot_lens = [len(tokenizer(shot_text(record_segments(s, "instruction", tokenizer), tokenizer.eos_token),
                               add_special_tokens=False).input_ids) for s in SHOTS]
    # the prompting context has room for exactly two of the three shots
    context = example_len + shot_lens[0] + shot_lens[1] + shot_lens[2] // 2
    [row] = score(scorer(example_len, context=context), json.dumps(RECORD))
    assert row["few_shot_shots"] == 2 and row["context"] == context
    assert row["base_prompt_tokens"] == row["variant_prompt_tokens"] == 1 + prompt_len
    assert row["few_shot_prompt_tokens"] == 1 + prompt_len + shot_lens[0] + shot_lens[1]
    [tight] = score(scorer(example_len, context=example_len), json.dumps(RECORD))
    assert tight["few_shot_shots"] == 0 and tight["few_shot_prompt_tokens"] == 1 + prompt_len
    # the default context is the base model's window, not the training length
    [fair] = score(scorer(example_len), json.dumps(RECORD))
    assert fair["context"] == 1024 and fair["few_shot_shots"] == 3


def test_losses_are_on_the_target_tokens_and_equal_for_equal_weights():
    s = scorer(256)
    good, bad = score(s, json.dumps(RECORD), "{not json")
    assert good["base_loss_sum"] == pytest.approx(good["variant_loss_sum"], rel=1e-5)
    assert good["base_tokens"] == good["variant_tokens"] == good["few_shot_tokens"] > 0
    # the same figure as the model's own loss on the training-style labels
    example = s.prepare(json.dumps(RECORD), "")["base"]
    with torch.no_grad():
        mean = load_base_model(s.job.model).eval()(input_ids=torch.tensor([example["input_ids"]]),
                                                   labels=torch.tensor([example["labels"]])).loss.item()
    assert good["base_loss_sum"] / good["base_tokens"] == pytest.approx(mean, rel=1e-4)
    assert bad["reason"] == "not_json" and math.isnan(bad["base_loss_sum"]) and not bad["generated"]


def test_a_variant_only_pass_of_a_full_model_loads_no_base_model_and_scores_the_same():
    """A sweep's later winners are scored on the variant arm alone (the other arms come from
    the first winner's eval): a full model's actor then holds one copy of the weights."""
    full = scorer(256)
    alone = ArmScorer(full.job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "instruction", {},
                      generate_keys=[record_key("eval.jsonl", 1)], arms=("variant",))
    assert full.base is not None and alone.base is None
    [both], [one] = score(full, json.dumps(RECORD)), score(alone, json.dumps(RECORD))
    assert one["variant_loss_sum"] == pytest.approx(both["variant_loss_sum"], rel=1e-6)
    assert one["variant_answer"] == both["variant_answer"] and one["context"] == both["context"] == 1024
    assert math.isnan(one["base_loss_sum"]) and one["few_shot_shots"] == 0 and one["base_answer"] == ""


def test_a_variant_in_the_store_is_downloaded_for_loading_and_the_copy_removed(s3_server, tmp_path, monkeypatch):
    """A sweep's winners are evaluated from object storage: each actor copies the weights to
    its disk to load them, and leaves nothing there (a full 8B model is 16 GB per actor)."""
    import tempfile

    from tests.conftest import make_bucket

    client = make_bucket(s3_server, "variants")
    for file in (ASSETS / "tiny-llama").iterdir():
        client.upload_file(str(file), "variants", f"winner/weights/{file.name}")
    job = config_from_dict({"data": {"train": "unused.jsonl"}, "storage": {"endpoint_url": s3_server}})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stored = ArmScorer(job.model_dump_json(), "s3://variants/winner/weights", [], "instruction", {},
                       generate_keys=[], arms=("variant",))
    assert list(tmp_path.iterdir()) == []
    local = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "instruction", {},
                      generate_keys=[], arms=("variant",))
    [row], [same] = score(stored, json.dumps(RECORD)), score(local, json.dumps(RECORD))
    assert row["variant_loss_sum"] == pytest.approx(same["variant_loss_sum"], rel=1e-6)


def test_generated_answers_are_scored_against_the_reference():
    s = scorer(256, regex=r"(?s)Hi \w+,.*")
    first, second = score(s, json.dumps(RECORD), json.dumps(RECORD))
    assert first["generated"] and not second["generated"]  # only the keys the driver chose
    assert first["reference"] == RECORD["output"]
    for arm in ("base", "few_shot", "retrieval", "variant"):
        answer = first[f"{arm}_answer"]
        assert first[f"{arm}_exact"] == metrics.exact_match(answer, RECORD["output"])
        assert first[f"{arm}_chrf"] == pytest.approx(metrics.chrf(answer, RECORD["output"]))
        assert first[f"{arm}_format"] == metrics.in_format(answer, r"(?s)Hi \w+,.*")
        assert 0 < first[f"{arm}_gen_tokens"] <= 12 and first[f"{arm}_gen_s"] > 0
    assert first["base_answer"] == first["variant_answer"]  # greedy, same weights
    assert math.isnan(second["base_chrf"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_run_on_the_base_they_trained_on(method, tmp_path):
    from ft_ray.models import apply_lora, load_quantized_model

    job = config_from_dict({"method": method, "data": {"train": "unused.jsonl"},
                            "quantization": {"compute_dtype": "float32"}, "lora": {"rank": 4}})
    base = (load_quantized_model(job.model, job.quantization, False) if method == "qlora"
            else load_base_model(job.model))
    apply_lora(base, job.lora, "builtin:tiny-llama").save_pretrained(tmp_path / "adapter")
    s = ArmScorer(job.model_dump_json(), str(tmp_path / "adapter"), [], "instruction", {}, generate_keys=[])
    assert s.shared  # one model: the base arms run with the adapter switched off
    assert ("Linear4bit" in {type(m).__name__ for m in s.variant.modules()}) == (method == "qlora")
    [row] = score(s, json.dumps(RECORD))
    # a fresh adapter changes nothing yet (LoRA's B starts at zero)
    assert row["variant_loss_sum"] == pytest.approx(row["base_loss_sum"], rel=1e-5)
    assert row["base_tokens"] > 0 and math.isfinite(row["base_loss_sum"]) and row["few_shot_shots"] == 0


def test_a_pair_is_scored_on_its_chosen_and_on_its_rejected_answer():
    rejected = "Dear Ben, we are sorry. Regards, Support"
    pair = {"instruction": RECORD["instruction"], "input": RECORD["input"], "chosen": RECORD["output"],
            "rejected": rejected}
    job = config_from_dict({"model": {"max_seq_len": 256}, "data": {"train": "unused.jsonl"}})
    pairs = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "auto", {}, generate_keys=[])
    [row] = score(pairs, json.dumps(pair))
    chosen, other = score(scorer(256), json.dumps(RECORD), json.dumps({**RECORD, "output": rejected}))
    for arm in ("base", "variant"):
        assert row[f"{arm}_loss_sum"] == pytest.approx(chosen[f"{arm}_loss_sum"], rel=1e-5)
        assert row[f"{arm}_rejected_loss_sum"] == pytest.approx(other[f"{arm}_loss_sum"], rel=1e-5)
        assert row[f"{arm}_rejected_tokens"] == other[f"{arm}_tokens"] > 0
    [plain] = score(scorer(256), json.dumps(RECORD))
    assert math.isnan(plain["base_rejected_loss_sum"]) and plain["base_rejected_tokens"] == 0


def test_retrieval_puts_the_most_similar_training_examples_before_the_prompt():
    job = config_from_dict({"model": {"max_seq_len": 256}, "data": {"train": "unused.jsonl"}, "eval": {"few_shot": 2}})
    tokenizer = load_tokenizer(job.model)
    pool = [{"instruction": "Reply in the house style.", "input": text, "output": f"Hi {name}, on it.\nWarmly"}
            for name, text in (("Ana", "From Ana: my tent pole snapped."), ("Dev", "From Dev: where is my order?"),
                               ("Kim", "From Kim: the tent fabric is torn."), ("Lee", "From Lee: a refund please."))]
    segments = [record_segments(r, "instruction", tokenizer) for r in pool]
    s = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "instruction", {}, generate_keys=[],
                  pool={"prompts": [seg[0][0] for seg in segments],
                        "shots": [shot_text(seg, tokenizer.eos_token) for seg in segments]})
    example = s.prepare(json.dumps(RECORD), "")  # "From Ben: my tent is torn."
    nearest = [tokenizer.decode(ids) for ids in example["prefixes"]["retrieval"]]
    assert "From Kim:" in nearest[0] and "From Ana:" in nearest[1]  # the torn tent, then the tent
    [row] = score(s, json.dumps(RECORD))
    assert row["retrieval_shots"] == 2 and row["few_shot_shots"] == 0  # no fixed shots were given
    assert row["retrieval_prompt_tokens"] == row["base_prompt_tokens"] + sum(map(len, example["prefixes"]["retrieval"]))


def test_a_grpo_run_s_rewards_score_every_arm_s_answers_of_a_batch_in_one_call():
    """`ft-ray eval` of a GRPO run scores each generated answer with the run's rewards; a
    batched reward (a reward model runs in batches) is called once per batch with every arm's
    answers, not once per answer."""
    from tests import grpo_rewards

    job = config_from_dict({"objective": "grpo", "model": {"max_seq_len": 256}, "data": {"train": "unused.jsonl"},
                            "grpo": {"rewards": {"tests.grpo_rewards:counted_words": 1.0}},
                            "eval": {"max_new_tokens": 6, "few_shot": 1}})
    tokenizer = load_tokenizer(job.model)
    shots = [shot_text(record_segments(SHOTS[0], "instruction", tokenizer), tokenizer.eos_token)]
    s = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), shots, "instruction", {},
                  generate_keys=[record_key("eval.jsonl", 1), record_key("eval.jsonl", 3)])
    grpo_rewards.BATCHES.clear()
    rows = score(s, json.dumps(RECORD), json.dumps(SHOTS[1]), json.dumps(SHOTS[2]))
    arms = [arm.name for arm in s.arms]
    assert len(arms) >= 3 and grpo_rewards.BATCHES == [2 * len(arms)]  # records 1 and 3 generated
    for row in (rows[0], rows[2]):
        assert [row[f"{arm}_reward"] for arm in arms] == [len(row[f"{arm}_answer"].split()) for arm in arms]
    assert all(math.isnan(rows[1][f"{arm}_reward"]) for arm in arms)


def test_a_few_shot_prompt_has_the_ids_of_its_whole_text(tmp_path):
    """With a tokenizer that opens a text with SentencePiece's "▁" (Llama 2, Mistral v0.1-0.3,
    Phi-3), a few-shot prompt is tokenized as the one text it is: only its first example opens
    with the mark, not each example and the prompt after them (which a served request never
    has). The plain arms keep the record's own ids."""
    from tests.conftest import sentencepiece_tokenizer

    spm = sentencepiece_tokenizer(tmp_path / "spm-llama")
    job = config_from_dict({"model": {"name_or_path": str(tmp_path / "spm-llama")}, "data": {"train": "unused.jsonl"},
                            "eval": {"few_shot": 2, "max_new_tokens": 4}})
    shots = [shot_text(record_segments(s, "instruction", spm), spm.eos_token) for s in SHOTS[:2]]
    s = ArmScorer(job.model_dump_json(), str(tmp_path / "spm-llama"), shots, "instruction", {},
                  generate_keys=[record_key("eval.jsonl", 1)])
    example = s.prepare(json.dumps(RECORD), "")
    segments = record_segments(RECORD, "instruction", spm)
    whole = "".join(shots) + "".join(text for text, _ in segments)
    assert example["few_shot"]["input_ids"] == [spm.bos_token_id] + spm(whole, add_special_tokens=False).input_ids
    alone = "".join(text for text, _ in segments)
    assert example["base"]["input_ids"] == [spm.bos_token_id] + spm(alone, add_special_tokens=False).input_ids
    # the answer is scored on the same tokens in every arm
    labelled = [[i for i, label in zip(example[arm]["input_ids"], example[arm]["labels"]) if label != -100]
                for arm in ("base", "few_shot")]
    assert labelled[0] == labelled[1]
    [row] = score(s, json.dumps(RECORD))
    prompt = "".join(shots) + segments[0][0]
    assert row["few_shot_shots"] == 2
    assert row["few_shot_prompt_tokens"] == 1 + len(spm(prompt, add_special_tokens=False).input_ids)


def test_answers_are_compared_after_a_reasoning_block_and_without_the_turn_end(tmp_path):
    """Qwen3's hybrid template writes an empty "<think>\\n\\n</think>\\n\\n" before every answer
    trained without reasoning, and its turn end (<|im_end|>) is not a base model's eos. The
    reference is the answer as a generated one reads (no special tokens), and exact match and
    chrF compare what follows the reasoning block: a model that answers the reference's words
    without the block scores 1."""
    from ft_ray.config import ModelConfig
    from ft_ray.models import save_base_model

    folder = save_base_model(ModelConfig(), tmp_path / "thinking")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ '<|user|>\\n' + m.content + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|assistant|>\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    tokenizer.save_pretrained(folder)
    job = config_from_dict({"model": {"name_or_path": str(folder)}, "data": {"train": "unused.jsonl"},
                            "eval": {"max_new_tokens": 12}})
    s = ArmScorer(job.model_dump_json(), str(folder), [], "chat", {}, generate_keys=[record_key("eval.jsonl", 1)],
                  arms=("base", "variant"))

    def chat(answer: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": "From Ben: my tent is torn."},
                                        {"role": "assistant", "content": answer}]})

    [first] = score(s, chat("Hi Ben."))
    assert first["reference"] == "<think>\n\n</think>\n\nHi Ben."
    said = first["variant_answer"]  # the model's own words (it never saw the block)
    assert said and "<think>" not in said and first["variant_exact"] == 0.0
    [again] = score(s, chat(said))
    assert again["variant_answer"] == again["base_answer"] == said
    assert again["variant_exact"] == again["base_exact"] == 1.0 and again["variant_chrf"] == 1.0


def test_a_distillation_run_scores_its_teacher_as_an_arm(tmp_path):
    """objective distill adds the teacher arm: the teacher's own weights, scored and answering as
    the variant arm does when the teacher is the variant (the same loss and answer)."""
    from tests.conftest import teacher_llama

    teacher = str(teacher_llama(tmp_path / "teacher"))
    job = config_from_dict({"objective": "distill", "distill": {"teacher": teacher}, "data": {"train": "unused.jsonl"},
                            "eval": {"max_new_tokens": 12}})
    keys = [record_key("eval.jsonl", 1)]
    s = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "instruction", {}, generate_keys=keys,
                  arms=("base", "teacher", "variant"))
    as_variant = ArmScorer(job.model_dump_json(), teacher, [], "instruction", {}, generate_keys=keys, arms=("variant",))
    assert [arm.name for arm in s.all_arms] == ["base", "few_shot", "retrieval", "teacher", "variant"]
    [row], [taught] = score(s, json.dumps(RECORD)), score(as_variant, json.dumps(RECORD))
    assert row["teacher_loss_sum"] == pytest.approx(taught["variant_loss_sum"], rel=1e-6)
    assert row["teacher_answer"] == taught["variant_answer"] and row["teacher_tokens"] == row["variant_tokens"]
    # the teacher is the built-in model with its output layer doubled: surer of its tokens, not the same loss
    assert row["variant_loss_sum"] == pytest.approx(row["base_loss_sum"], rel=1e-6)
    assert abs(row["teacher_loss_sum"] - row["base_loss_sum"]) > 0.1


def test_a_teacher_of_another_tokenizer_is_scored_and_answers_in_its_own_tokens(tmp_path):
    """distill.divergence uld: the teacher arm reads each example in its own tokens (the same
    text), its loss counted per token of the model's (its loss of the answer's text over the
    model's tokens of it), and answers in its own tokens. The built-in model under renumbered
    ids as the teacher scores and answers exactly as the base arm does."""
    from tests.conftest import cross_tokenizer_llama

    keys = [record_key("eval.jsonl", 1)]
    for teacher, same in ((cross_tokenizer_llama(tmp_path / "relabelled"), True),
                          (cross_tokenizer_llama(tmp_path / "bpe", permuted=False), False)):
        job = config_from_dict({"objective": "distill", "distill": {"teacher": str(teacher), "divergence": "uld"},
                                "data": {"train": "unused.jsonl"}, "eval": {"max_new_tokens": 12}})
        s = ArmScorer(job.model_dump_json(), str(ASSETS / "tiny-llama"), [], "instruction", {}, generate_keys=keys,
                      arms=("base", "teacher"))
        [row] = score(s, json.dumps(RECORD))
        assert row["teacher_tokens"] == row["base_tokens"] > 10
        if same:
            assert row["teacher_loss_sum"] == pytest.approx(row["base_loss_sum"], rel=1e-5)
            assert row["teacher_answer"] == row["base_answer"] and row["teacher_gen_tokens"] == 12
        else:  # random weights, whose merges cross words: another loss, its answer read back from its own tokens
            assert math.isfinite(row["teacher_loss_sum"]) and abs(row["teacher_loss_sum"] - row["base_loss_sum"]) > 1
            assert row["teacher_gen_tokens"] > 0
            assert row["teacher_answer"] == load_tokenizer(job.teacher).decode(
                load_tokenizer(job.teacher)(row["teacher_answer"], add_special_tokens=False)["input_ids"])
