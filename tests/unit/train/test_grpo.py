"""GRPO's pieces: group advantages, the loss and its gradient, the settings it refuses, and
a few DDP steps in one process (no Ray) that teach the model the rewarded opening (its rewards:
tests/unit/evaluation/test_metrics.py)."""

from __future__ import annotations

import json

import pytest
import torch

from ft_ray.config import ConfigError, config_from_dict
from ft_ray.train.grpo import ADVANTAGE_EPSILON, group_advantages, grpo_loss
from tests.conftest import DEMO, tiny_reward_model


def test_advantages_are_rewards_against_their_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as TRL's
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + ADVANTAGE_EPSILON)
    assert torch.allclose(group_advantages(rewards, 4), torch.cat([expected, torch.zeros(4)]))
    unscaled = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])  # scale_rewards: none (Dr. GRPO)
    assert torch.allclose(group_advantages(rewards, 4, scale=False), unscaled)


def test_the_loss_is_the_advantage_weighted_policy_gradient_over_answer_tokens_plus_beta_kl():
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # 3 answer tokens
    advantages = torch.tensor([1.0, -2.0])
    loss, kl, clipped = grpo_loss(logps, logps.detach(), advantages, mask, beta=0.0, ref_logps=None)
    assert loss.item() == pytest.approx((-1.0 * 2 + 2.0 * 1) / 3) and kl.item() == 0.0 and clipped.item() == 0.0
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -1 / 3, -1 / 3, 0.0], [0.0, 2 / 3, 0.0, 0.0]]))
    ref = logps.detach() + 0.1
    _, kl, _ = grpo_loss(logps, logps.detach(), advantages, mask, beta=0.5, ref_logps=ref)
    assert kl.item() == pytest.approx(torch.exp(torch.tensor(0.1)).item() - 0.1 - 1, rel=1e-5)  # k3 per token
    _, none, _ = grpo_loss(logps, logps.detach(), advantages, mask, beta=0.5, ref_logps=logps.detach())
    assert none.item() == 0.0
    for loss_type, row_weights in (("grpo", [1 / 2 / 2, 1 / 1 / 2]),  # each answer's token mean, then answers'
                                   ("dr_grpo", [1 / (2 * 4), 1 / (2 * 4)])):  # sum over 2 answers x 4 new tokens
        logps.grad = None
        grpo_loss(logps, logps.detach(), advantages, mask, beta=0.0, ref_logps=None, loss_type=loss_type,
                  max_new_tokens=4)[0].backward()
        expected = -advantages[:, None] * torch.tensor(row_weights)[:, None] * mask
        assert torch.allclose(logps.grad, expected), loss_type


def test_a_later_update_on_the_same_answers_clips_the_ratio_as_ppo():
    """Token ratios r = exp(logp - old): 1.5 on a token with advantage 1 counts as 1.2 (no
    gradient: clipped), 0.5 with advantage -2 as 0.8 (clipped); 1.1 with advantage -2 keeps its
    gradient. epsilon_high (DAPO's clip-higher) moves only the upper bound."""
    old = torch.zeros(2, 3)
    logps = torch.log(torch.tensor([[1.0, 1.5, 1.0], [1.0, 0.5, 1.1]])).requires_grad_()
    mask = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -2.0])
    loss, _, clipped = grpo_loss(logps, old, advantages, mask, beta=0.0, ref_logps=None, epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 * 1 + 0.8 * 2 + 1.1 * 2) / 3)
    assert clipped.item() == pytest.approx(2 / 3)
    loss.backward()  # d(-r A)/d logp = -r A on the unclipped token only
    assert torch.allclose(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2 * 1.1 / 3]]))
    higher, _, clipped = grpo_loss(logps, old, advantages, mask, beta=0.0, ref_logps=None, epsilon=0.2,
                                   epsilon_high=0.6)
    assert higher.item() == pytest.approx((-1.5 * 1 + 0.8 * 2 + 1.1 * 2) / 3) and clipped.item() == pytest.approx(1 / 3)


def test_each_steps_batches_are_handed_over_num_iterations_times_in_a_row():
    from ft_ray.train.loop import steps_of

    micro = iter(range(7))  # 3 steps of 2 micro batches and one more micro batch, left out
    assert list(steps_of(micro, 2, 3)) == [[0, 1]] * 3 + [[2, 3]] * 3 + [[4, 5]] * 3
    assert list(steps_of(iter(range(3)), 2)) == [[0, 1]]
    config = config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"num_iterations": 2},
                               "train": {"max_steps": 8, "eval_every": 4, "checkpoint_every": 4}})
    assert config.rounds == 2
    with pytest.raises(ConfigError, match=r"train.eval_every: 5 is not a multiple of grpo.num_iterations \(2\)"):
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"num_iterations": 2},
                          "train": {"max_steps": 8, "eval_every": 5, "checkpoint_every": 4}})
    with pytest.raises(ConfigError, match="'grpo.num_iterations'"):  # TRL's name where it does not belong
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "train": {"num_iterations": 2}})


def test_dapo_weighs_every_answer_token_of_a_step_alike_across_micro_batches():
    """loss_type dapo: a step of two micro batches (2 prompts x 4 sampled answers each, of other
    lengths) is sampled before its update (`step_weights`: each micro batch's answer tokens),
    and its micro batches scaled by `loop.step_scales` give the gradient of the mean over all
    16 answers' tokens at once; the mean of the two micro batches' means (bnpo; ft-ray's only
    normalisation before) gives another. grpo and dr_grpo weigh micro batches by answers."""
    import torch.nn.functional as F

    from ft_ray.data.tokenize import IGNORE_INDEX
    from ft_ray.models import load_tokenizer
    from ft_ray.train.grpo import round_key
    from ft_ray.train.loop import step_scales
    from ft_ray.train.preference import token_logps_of

    engine, config = grpo_engine(steps=1, max_new_tokens=48, rewards={"chrf": 1.0})
    tokenizer = load_tokenizer(config.model)
    batch = demo_batch(tokenizer)
    halves = [{key: value[part] for key, value in batch.items()} for part in (slice(0, 2), slice(2, 4))]
    torch.manual_seed(0)
    weights = engine.step_weights(halves)
    rounds = [engine.objective.rounds[round_key(half)] for half in halves]
    assert weights == [r.mask.sum().item() for r in rounds] and weights[0] != weights[1]  # 287 and 320 tokens
    for loss_type, expected in (("bnpo", [1.0, 1.0]), ("grpo", [8.0, 8.0]), ("dr_grpo", [8.0, 8.0])):
        engine.objective.settings.loss_type = loss_type
        assert engine.step_weights(halves) == expected  # the rounds kept: nothing sampled again
    engine.objective.settings.loss_type = "dapo"

    def gradient(step) -> torch.Tensor:
        engine.module.zero_grad(set_to_none=True)
        step()
        return torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None])

    def all_at_once() -> None:
        width = max(r.scored["input_ids"].shape[1] for r in rounds)
        rows = {"input_ids": torch.cat([F.pad(r.scored["input_ids"], (0, width - r.scored["input_ids"].shape[1]),
                                              value=tokenizer.pad_token_id) for r in rounds]),
                "labels": torch.cat([F.pad(r.scored["labels"], (0, width - r.scored["labels"].shape[1]),
                                           value=IGNORE_INDEX) for r in rounds]),
                "position_ids": torch.arange(width).expand(16, width)}
        mask = torch.cat([F.pad(r.mask, (0, width - r.mask.shape[1])) for r in rounds])
        logps = token_logps_of(engine.model, rows)
        grpo_loss(logps, logps.detach(), torch.cat([r.advantages for r in rounds]), mask, 0.0, None)[0].backward()

    whole = gradient(all_at_once)
    stepped = gradient(lambda: [engine.micro_step(half, scale, True)
                                for half, scale in zip(halves, step_scales(weights))])
    assert not engine.objective.rounds  # the micro steps took the sampled rounds

    def off(g: torch.Tensor) -> float:
        return ((g - whole).norm() / whole.norm()).item()

    assert off(stepped) < 1e-5
    for half, round_ in zip(halves, rounds):  # the same answers again, each micro batch's mean weighed alike
        engine.objective.rounds[round_key(half)] = round_
    assert off(gradient(lambda: [engine.micro_step(half, 0.5, True) for half in halves])) > 1e-2  # 0.047


def test_grpo_reads_one_prompt_per_row_and_is_told_what_it_lacks():
    assert config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}}).data.pack is False
    with pytest.raises(ConfigError, match="data.pack: objective grpo reads one prompt per row"):
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl", "pack": True}})
    with pytest.raises(ConfigError, match="grpo.rewards: format needs grpo.format_regex"):
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"rewards": {"format": 1}}})
    with pytest.raises(ConfigError, match="eval.metric: reward scores generations with grpo.rewards .objective grpo., "
                                          "not objective sft"):
        config_from_dict({"data": {"train": "t.jsonl"}, "eval": {"metric": "reward"}})
    with pytest.raises(ConfigError, match="objective grpo trains on format instruction or chat or completion"):
        config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl", "format": "text"}})


def grpo_engine(method: str = "lora", steps: int = 40, **grpo):
    from ft_ray.train.engines import DDPEngine
    from ft_ray.train.modeling import build_model
    from ft_ray.train.objectives import build_objective

    config = config_from_dict({"objective": "grpo", "method": method, "data": {"train": "t.jsonl"},
                               "lora": {"dropout": 0.0}, "quantization": {"compute_dtype": "float32"},
                               "train": {"learning_rate": 5e-3, "warmup_steps": 0},
                               "grpo": {"rewards": {"format": 1.0}, "format_regex": "(?s)Hi .*", "max_new_tokens": 8,
                                        **grpo}})
    torch.manual_seed(0)  # LoRA's initialisation: not whatever the tests before left (40 steps teach 2-4 of 4 by seed)
    model = build_model(config, "builtin:tiny-llama")
    return DDPEngine(model, config, total_steps=steps, objective=build_objective(config, model)), config


def demo_batch(tokenizer) -> dict[str, torch.Tensor]:
    """The first four demo records, one per row, right-padded."""
    from ft_ray.data.records import parse_record

    records = (DEMO / "train.jsonl").read_text().splitlines()[:4]
    assert all(json.loads(r)["output"].startswith("Hi ") for r in records)  # what the rewards compare with
    examples = [parse_record(r, "", "instruction", {}, tokenizer, 256, None) for r in records]
    width = max(len(e["input_ids"]) for e in examples)
    return {"input_ids": torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"]))
                                       for e in examples]),
            "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]),
            "position_ids": torch.arange(width).expand(4, width)}


def test_a_few_ddp_steps_teach_the_rewarded_opening():
    """The built-in model rarely opens a reply with "Hi " (about 1 answer in 5 sampled); rewarded
    for it, its greedy answers to four demo prompts open so within 40 steps."""
    from ft_ray.models import load_tokenizer

    engine, config = grpo_engine()
    batch = demo_batch(load_tokenizer(config.model))
    before = engine.eval_loss_sum(batch)
    torch.manual_seed(0)
    sampled = []
    for _ in range(40):
        sampled.append(engine.micro_step(batch, 1.0, True)[1])
        engine.step()
    after = engine.eval_loss_sum(batch)
    assert set(sampled[0]) == {"reward", "reward_std", "answer_tokens", "kl", "clip_ratio"}
    assert sampled[0]["answer_tokens"] == 4 * 8
    assert before[2]["reward"] == 0.0 and before[0] == 0.0  # greedy: no answer opens with "Hi "
    assert after[2]["reward"] >= 3 and after[0] == -after[2]["reward"]  # eval loss: minus the reward


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_full_and_qlora_steps_with_their_kl_reference(method):
    """A full fine-tune's reference is a frozen copy of the base; QLoRA's the 4-bit base with
    the adapter off. Two steps: the trained weights move and the KL to the reference grows from 0."""
    from ft_ray.models import load_tokenizer

    engine, config = grpo_engine(method, steps=2, beta=0.1)
    batch = demo_batch(load_tokenizer(config.model))
    trained = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    kls = []
    for _ in range(2):
        kls.append(engine.micro_step(batch, 1.0, True)[1]["kl"])
        engine.step()
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 0
    assert any(not torch.equal(p.detach(), trained[n]) for n, p in engine.module.named_parameters() if n in trained)


def test_a_conversation_is_asked_its_first_question_and_scored_against_its_first_answer():
    from ft_ray.data.records import parse_record
    from ft_ray.models import load_tokenizer
    from ft_ray.train.grpo import GRPOObjective

    config = config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}})
    tokenizer = load_tokenizer(config.model)
    record = {"messages": [{"role": "user", "content": "Tent size?"}, {"role": "assistant", "content": "Two people."},
                           {"role": "user", "content": "Weight?"}, {"role": "assistant", "content": "Two kilos."}]}
    example = parse_record(json.dumps(record), "", "chat", {}, tokenizer, 256, None)
    batch = {k: torch.tensor([example[k]]) for k in ("input_ids", "labels")}
    [prompt], [reference] = GRPOObjective(config, tokenizer, None).prompts_of(batch)
    assert reference.strip() == "Two people."
    assert "Tent size?" in tokenizer.decode(prompt) and "Two people." not in tokenizer.decode(prompt)


def test_answers_cut_at_max_new_tokens_do_not_train_when_masked():
    """8 new tokens end no answer of the built-in model: with mask_truncated_answers nothing
    trains (B stays at PEFT's zero); without, it does."""
    from ft_ray.models import load_tokenizer

    moved = {}
    for masked in (True, False):
        engine, config = grpo_engine(steps=1, mask_truncated_answers=masked, rewards={"chrf": 1.0})
        torch.manual_seed(0)
        engine.micro_step(demo_batch(load_tokenizer(config.model)), 1.0, True)
        engine.step()
        moved[masked] = max(p.abs().max().item() for n, p in engine.module.named_parameters() if "lora_B" in n)
    assert moved[True] == 0.0 and moved[False] > 0


def test_a_batch_is_sampled_the_same_way_whatever_came_before_so_a_resume_samples_the_same():
    from ft_ray.models import load_tokenizer

    engine, config = grpo_engine()
    objective = engine.objective
    batch = {**demo_batch(load_tokenizer(config.model)), "seq_id": torch.tensor([11, 12, 13, 14])}
    prompts, _ = objective.prompts_of(batch)
    runs = []
    for before in (1, 2):  # another global random state each time (a resumed run's)
        torch.manual_seed(before)
        state = torch.get_rng_state()
        runs.append(objective.sample(engine.module, prompts, 4, True, objective.sampling_seed(batch)))
        assert torch.equal(torch.get_rng_state(), state)  # the global state is left as it was
    assert runs[0] == runs[1]
    other = {**batch, "seq_id": torch.tensor([21, 22, 23, 24])}
    assert objective.sample(engine.module, prompts, 4, True, objective.sampling_seed(other)) != runs[0]


def test_with_num_iterations_a_batch_is_sampled_once_and_updated_on_again_with_the_ratio_clipped():
    """num_iterations 2: the batch's first step samples and keeps its answers; the second
    updates on the same answers (the same rewards; the ratio to the sampling policy moved, some
    tokens clipped at a small epsilon); the third samples again, the fourth updates on those."""
    from ft_ray.models import load_tokenizer

    engine, config = grpo_engine(steps=4, num_iterations=2, epsilon=0.001, rewards={"chrf": 1.0})
    objective = engine.objective
    batch = demo_batch(load_tokenizer(config.model))
    sampled = []
    original = objective.sample
    objective.sample = lambda *args, **kwargs: sampled.append(1) or original(*args, **kwargs)
    torch.manual_seed(0)
    steps = []
    for _ in range(4):
        steps.append(engine.micro_step(batch, 1.0, True)[1])
        engine.step()
    assert len(sampled) == 2 and not objective.rounds  # steps 1 and 3 sampled; nothing kept after a round
    assert steps[1]["reward"] == steps[0]["reward"] and steps[1]["answer_tokens"] == steps[0]["answer_tokens"]
    assert steps[0]["clip_ratio"] == 0.0 and steps[1]["clip_ratio"] > 0


def test_a_reward_model_scores_the_sampled_answers(tmp_path):
    """grpo.rewards model:<folder>: the worker loads the reward model; the rewards of the
    sampled answers are its scores of each prompt + answer as it trains on them (bos, prompt,
    answer, eos), and a step trains on them."""
    from transformers import AutoModelForSequenceClassification

    from ft_ray.models import load_tokenizer

    rm = tiny_reward_model(tmp_path / "rm")
    engine, config = grpo_engine(steps=1, rewards={f"model:{rm}": 1.0})
    tokenizer, objective = load_tokenizer(config.model), engine.objective
    batch = demo_batch(tokenizer)
    answers, rewards, _ = objective.answered(engine.module, batch, group=2, sampled=True)
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in objective.prompts_of(batch)[0]]
    scorer = AutoModelForSequenceClassification.from_pretrained(rm)
    with torch.no_grad():
        alone = [scorer(input_ids=torch.tensor([
            [tokenizer.bos_token_id] + tokenizer(prompts[i // 2], add_special_tokens=False).input_ids
            + tokenizer(tokenizer.decode(a, skip_special_tokens=True) + tokenizer.eos_token,
                        add_special_tokens=False).input_ids])).logits[0, 0].item() for i, a in enumerate(answers)]
    assert rewards.tolist() == pytest.approx(alone, abs=1e-4)
    metrics = engine.micro_step(batch, 1.0, True)[1]
    assert metrics["reward_std"] > 0 and engine.step() > 0  # answers scored apart; a gradient


def test_answers_end_at_the_templates_end_of_turn_where_it_is_not_the_eos():
    """A base model's eos is often not the token its chat template closes assistant turns with
    (Qwen2.5 base: <|endoftext|> vs <|im_end|>; Llama 3.1 base: <|end_of_text|> vs <|eot_id|>).
    The built-in model closes its turns with <|end|>, its eos; with another eos, sampled answers
    and `generate` still stop at <|end|>, which ends (and trains) the answer."""
    from ft_ray.config import ModelConfig
    from ft_ray.models import generate, load_base_model, load_tokenizer, stop_ids
    from ft_ray.train.grpo import GRPOObjective

    chatml = load_tokenizer(ModelConfig(chat_template="chatml", add_tokens=["<|im_start|>", "<|im_end|>"]))
    assert stop_ids(chatml) == [chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")]
    tokenizer = load_tokenizer(ModelConfig())
    end = tokenizer.eos_token_id
    assert stop_ids(tokenizer) == [end]
    tokenizer.eos_token = "<|system|>"
    assert stop_ids(tokenizer) == [tokenizer.eos_token_id, end]
    config = config_from_dict({"objective": "grpo", "data": {"train": "t.jsonl"}, "grpo": {"max_new_tokens": 80}})
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "My tent arrived with a torn door. What now?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = load_base_model(config.model)
    [answer] = GRPOObjective(config, tokenizer, None).sample(model, [ids], group=1, sampled=False)
    assert answer[-1] == end and end not in answer[:-1] and len(answer) < 80
    assert generate(model, tokenizer, prompt, 80) == tokenizer.decode(answer, skip_special_tokens=True)
