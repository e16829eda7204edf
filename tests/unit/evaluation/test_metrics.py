"""Answer scores, GRPO's rewards, the paired bootstrap and the verdict on hand-made cases with
known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ft_ray.config import ConfigError, InputError, config_from_dict
from ft_ray.evaluation import metrics
from ft_ray.evaluation.metrics import reward_function
from tests.conftest import tiny_reward_model


def test_exact_match_ignores_whitespace_only():
    assert metrics.exact_match("Hi Ben,\n thanks  ", "Hi Ben, thanks") == 1.0
    assert metrics.exact_match("Hi Ben, thanks!", "Hi Ben, thanks") == 0.0
    assert metrics.exact_match("", "x") == 0.0


def test_chrf_is_one_for_the_reference_zero_for_nothing_in_common_and_between_otherwise():
    reference = "Good news: we will send a new rain jacket at no cost."
    assert metrics.chrf(reference, reference) == pytest.approx(1.0)
    assert metrics.chrf("zzz qqq", reference) == 0.0
    close, far = metrics.chrf("Good news: we send a new jacket at no cost.", reference), metrics.chrf("news", reference)
    assert 0.6 < close < 1.0
    assert 0.0 < far < close


def test_format_adherence_needs_the_whole_answer_to_match():
    pattern = r"(?s)Hi \w+,.*Warmly, the Northwind team"
    assert metrics.in_format("  Hi Ben, ok.\nWarmly, the Northwind team\n", pattern) == 1.0
    assert metrics.in_format("Hi Ben, ok.\nWarmly, the Northwind team. PS", pattern) == 0.0
    assert metrics.in_format("Hello Ben", pattern) == 0.0


def test_an_answer_is_cut_where_the_model_starts_another_example():
    prompt = "### Instruction:\nReply.\n\n### Response:\n"
    assert metrics.cut_at_next_example("Hi Ben.\n\n### Instruction:\nReply again", prompt) == "Hi Ben."
    assert metrics.cut_at_next_example("  Hi Ben.  ", prompt) == "Hi Ben."


def test_the_final_answer_is_what_follows_a_reasoning_block():
    assert metrics.final_answer("<think>\nTwo and two.\n</think>\n\nFour.", "</think>") == "Four."
    assert metrics.final_answer("<think>\nTwo and two, so", "</think>") == ""  # cut before it closed
    assert metrics.final_answer("Four.", "</think>") == "Four."
    assert metrics.final_answer("<think></think>Four.", None) == "<think></think>Four."


def test_the_bootstrap_interval_is_the_same_for_the_same_seed_and_brackets_the_difference():
    rng = np.random.default_rng(1)
    ours = rng.normal(1.0, 0.3, 200)
    theirs = ours + rng.normal(0.5, 0.3, 200)  # theirs is worse by ~0.5 (lower is better)
    first = metrics.paired_bootstrap(ours, theirs, samples=500, seed=7, lower_is_better=True)
    assert first == metrics.paired_bootstrap(ours, theirs, samples=500, seed=7, lower_is_better=True)
    assert first != metrics.paired_bootstrap(ours, theirs, samples=500, seed=8, lower_is_better=True)
    difference, low, high = first
    assert difference == pytest.approx(float(np.mean(theirs - ours)))
    assert 0.4 < low < difference < high < 0.6


def test_the_bootstrap_statistic_is_the_weighted_mean():
    # two examples: mean losses 1 and 3 over 3 and 1 tokens -> loss per token 1.5
    difference, low, high = metrics.paired_bootstrap([1.0, 3.0], [2.0, 2.0], weights=[3, 1], samples=200)
    assert difference == pytest.approx(1.5 - 2.0)
    identical = metrics.paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], samples=200)
    assert identical == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        metrics.paired_bootstrap([1.0], [1.0, 2.0])


@pytest.mark.parametrize("low, high, outcome, words", [
    (0.5, 0.8, "variant_better", "the variant beats 3-shot prompting: loss 1.21 vs 1.87"),
    (-0.1, 0.3, "within_noise", "3-shot prompting is within noise of the variant"),
    (-0.8, -0.5, "other_better", "3-shot prompting beats the variant"),
])
def test_the_verdict_follows_the_interval(low, high, outcome, words):
    result = metrics.verdict("loss", 1.21, 1.87, 0.66, low, high, "3-shot prompting")
    assert result["outcome"] == outcome
    assert words in result["sentence"]
    assert result["fine_tuning_pays"] == (outcome == "variant_better")
    assert ("fine-tuning does not pay here" in result["sentence"]) == (outcome != "variant_better")
    assert f"95% CI of the difference [{low:.3g}, {high:.3g}]" in result["sentence"]


def test_rewards_are_the_weighted_sum_of_those_named():
    reward = reward_function({"exact": 2.0, "format": 0.5}, r"Hi .*")
    # exact match up to whitespace; the format the whole answer
    assert reward(["Hi  there\n", "Hello. Hi there"], ["Hi there", "Hi there"], ["", ""]) == [2.5, 0.0]
    assert 0 < reward_function({"chrf": 1.0}, None)(["Hi there, thanks"], ["Hi there"], [""])[0] < 1


def test_a_reward_of_your_own_is_module_function_and_said_when_it_is_not_there_or_not_a_number():
    prompt = "### Instruction:\nReply to this customer message in the Northwind house style."
    reward = reward_function({"tests.grpo_rewards:opens_like_the_reference": 1.0, "exact": 1.0}, None)
    assert reward(["Hi Ana, yes.", "Hello Ben."], ["Hi Ben, thanks.", "Hi Ben, thanks."], [prompt, prompt]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not the record's prompt"):  # it is given the prompt
        reward(["Hi Ana."], ["Hi Ben."], ["something else"])
    with pytest.raises(InputError, match="grpo.rewards: cannot import tests.grpo_rewards:missing \\(AttributeError"):
        reward_function({"tests.grpo_rewards:missing": 1.0}, None)
    with pytest.raises(InputError, match="cannot import no_such_module:f \\(ModuleNotFoundError"):
        reward_function({"no_such_module:f": 1.0}, None)
    with pytest.raises(TypeError, match="grpo.rewards: tests.grpo_rewards:not_a_number returned 'good' \\(str\\)"):
        reward_function({"tests.grpo_rewards:not_a_number": 1.0}, None)(["a"], ["b"], ["c"])
    with pytest.raises(ConfigError, match="grpo.rewards: 'bleu' is neither chrf, exact, format nor module:function"):
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"rewards": {"bleu": 1}}})


def test_a_reward_taking_completions_is_called_once_per_batch_as_trl_calls_it():
    """TRL's reward functions (`completions`, `prompts`, ... as lists, **kwargs) work as they are:
    one call per batch, the record's answers as `reference`, None for a completion not scored."""
    prompt = "### Instruction:\nReply to this customer message in the Northwind house style."
    per_batch = reward_function({"tests.grpo_rewards:open_like_the_references": 1.0,
                                 "tests.grpo_rewards:shorter_than_ten_words": 0.5}, None)
    answers = ["Hi Ana, yes.", "Hello Ben.", " ", "Hi " + "word " * 12]
    references = ["Hi Ben, thanks."] * 4
    assert per_batch(answers, references, [prompt] * 4) == [1.5, 0.5, 0.0, 1.0]
    # as the per-answer function it wraps
    per_answer = reward_function({"tests.grpo_rewards:opens_like_the_reference": 1.0}, None)
    assert per_answer(answers, references, [prompt] * 4) == reward_function(
        {"tests.grpo_rewards:open_like_the_references": 1.0}, None)(answers, references, [prompt] * 4)
    with pytest.raises(InputError, match="needs_a_solution takes completions .* but also needs solution; a batched "
                                         "reward is given prompts, completions, reference only"):
        reward_function({"tests.grpo_rewards:needs_a_solution": 1.0}, None)
    with pytest.raises(TypeError, match="one_number returned float 1.0, not a list of 2 numbers"):
        reward_function({"tests.grpo_rewards:one_number": 1.0}, None)(["a", "b"], ["a", "b"], ["", ""])


def test_a_reward_model_scores_each_prompt_and_answer_as_its_own_forward_pass_would(tmp_path):
    """`model:<folder>`: a sequence classifier with one score (here the built-in Llama's shape,
    its score head seeded) given each prompt and answer as training assembles them (bos,
    prompt, answer, eos) and read at the eos; batched and right-padded, each score equals the
    model's on that sequence alone, also where the pad token is the eos (the model's own
    pooling would read the token before it). A causal LM or a missing folder is refused before
    a run (`check_rewards`, no weights loaded)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ft_ray.evaluation.metrics import check_rewards

    base = tiny_reward_model(tmp_path / "rm").parent / "base"
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    prompts = ["Reply to: where is my tent?\n", "Reply to: refund please\n", "Reply to: hello\n"]
    answers = ["Hi Ana, thanks for writing to Northwind. It ships today.", "No.", "Hi"]
    check_rewards({f"model:{tmp_path / 'rm'}": 1.0})
    scores = reward_function({f"model:{tmp_path / 'rm'}": 2.0, "exact": 1.0}, None)(answers, ["Hi", "Hi", "Hi"], prompts)
    with torch.no_grad():
        alone = [scorer(input_ids=torch.tensor([[tokenizer.bos_token_id]
                                                + tokenizer(p, add_special_tokens=False).input_ids
                                                + tokenizer(a + tokenizer.eos_token, add_special_tokens=False).input_ids
                                                ])).logits[0, 0].item() for p, a in zip(prompts, answers)]
    assert scores == pytest.approx([2 * alone[0], 2 * alone[1], 2 * alone[2] + 1.0], abs=1e-4)
    assert len({round(s, 4) for s in alone}) == 3  # each text its own score
    tokenizer.pad_token = tokenizer.eos_token  # as many tokenizers without a pad token are set up
    tokenizer.save_pretrained(tmp_path / "eos-pad")
    scorer.config.pad_token_id = tokenizer.eos_token_id
    scorer.save_pretrained(tmp_path / "eos-pad")
    assert reward_function({f"model:{tmp_path / 'eos-pad'}": 1.0}, None)(answers, [""] * 3, prompts) == pytest.approx(
        alone, abs=1e-4)
    with pytest.raises(InputError, match=r"grpo.rewards: model:.*base is LlamaForCausalLM with 2 labels; a reward "
                                         r"model is a sequence classifier with one score"):
        check_rewards({f"model:{base}": 1.0})
    with pytest.raises(InputError, match="grpo.rewards: cannot load model:/nowhere/rm"):
        check_rewards({"model:/nowhere/rm": 1.0})


def test_a_reward_model_in_object_storage_scores_as_its_folder_does(s3_server, tmp_path):
    """`model:s3://...` (read with the job's storage section): checked before a run, copied to
    the node's model cache, scoring as the folder it was uploaded from; `ft-ray plan` counts it.
    A reward_model run's adapter in the store scores as its local folder does."""
    from ft_ray.config import StorageConfig
    from ft_ray.evaluation.metrics import check_rewards
    from ft_ray.plan import reward_model_shapes
    from tests.conftest import make_bucket

    folder = tiny_reward_model(tmp_path / "rm")
    client = make_bucket(s3_server, "rewards")
    for file in folder.iterdir():
        client.upload_file(str(file), "rewards", f"rm/{file.name}")
    storage = StorageConfig(path="s3://rewards/runs", endpoint_url=s3_server, model_cache=str(tmp_path / "cache"))
    prompts, answers = ["Reply to: where is my tent?\n", "Reply to: hello\n"], ["Hi Ana, it ships today.", "No."]
    check_rewards({"model:s3://rewards/rm": 1.0}, storage)
    stored = reward_function({"model:s3://rewards/rm": 1.0}, None, storage)(answers, ["", ""], prompts)
    assert stored == pytest.approx(reward_function({f"model:{folder}": 1.0}, None)(answers, ["", ""], prompts),
                                   abs=1e-6)

    def job(name: str):
        return config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"rewards": {name: 1.0}},
                                 "storage": storage.model_dump()})

    assert reward_model_shapes(job("model:s3://rewards/rm")) == reward_model_shapes(job(f"model:{folder}"))

    # a reward_model run's adapter (a score head and LoRA on the base it names, here a folder)
    import torch

    from ft_ray.config import LoraConfig, ModelConfig
    from ft_ray.models import apply_lora, load_base_model

    base = str(folder.parent / "base")
    adapter = apply_lora(load_base_model(ModelConfig(name_or_path=base), scores=True),
                         LoraConfig(rank=4, alpha=8, dropout=0.0), base, scores=True)
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name or "score" in name:
                weight.normal_(0, 0.2)
    adapter.save_pretrained(tmp_path / "adapter")
    for file in (tmp_path / "adapter").iterdir():
        client.upload_file(str(file), "rewards", f"runs/rm/adapter/{file.name}")
    local = reward_function({f"model:{tmp_path / 'adapter'}": 1.0}, None)(answers, ["", ""], prompts)
    assert reward_function({"model:s3://rewards/runs/rm/adapter": 1.0}, None, storage)(
        answers, ["", ""], prompts) == pytest.approx(local, abs=1e-6) and local != pytest.approx(stored, abs=1e-3)
    with pytest.raises(InputError, match="grpo.rewards: model:s3://rewards/none: no files in s3://rewards/none"):
        check_rewards({"model:s3://rewards/none": 1.0}, storage)
