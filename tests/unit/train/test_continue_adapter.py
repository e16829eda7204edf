"""`model.adapter`: a run that trains on from an adapter trained before (an SFT adapter then
DPO, or more data later), in one process: the job takes the adapter's LoRA settings, the model
starts where the adapter was, and a preference reference is that start, not the adapter off."""

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch

from ft_ray.config import ConfigError, InputError, config_from_dict
from ft_ray.models import with_adapter
from tests.conftest import untrained_llama


def job_dict(base: str, **sections) -> dict:
    return {"model": {"name_or_path": base, "max_seq_len": 1024, **sections.pop("model", {})},
            "data": {"train": "x.jsonl"}, "train": {"precision": "fp32"}, **sections}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """(the base, a run folder whose adapter/ is as a LoRA run saves one: rank 4 on q and v with
    B non-zero, and the rows of the special tokens the base never trained)."""
    from ft_ray.train.modeling import build_model

    folder = tmp_path_factory.mktemp("continue")
    base = str(untrained_llama(folder / "base"))
    job = config_from_dict(job_dict(base, lora={"rank": 4, "alpha": 8, "dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj"]}))
    model = build_model(job, base)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    model.save_pretrained(folder / "run" / "adapter", safe_serialization=True)
    return base, folder / "run"


def test_a_run_trains_on_from_the_adapter_as_peft_loads_it(started):
    from peft import PeftModel

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_base_model
    from ft_ray.train.modeling import build_model
    from ft_ray.train.preference import token_logps_of
    from tests.unit.train.test_preference_objectives import packed_demo_pairs

    base, run = started
    job = with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)}, lora={"dropout": 0.0})))
    assert (job.lora.rank, job.lora.alpha, job.lora.target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert job.model.adapter == str(run / "adapter")  # a run folder names its adapter/
    model = build_model(job, "/elsewhere/base_model")
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert model.peft_config["default"].base_model_name_or_path == "/elsewhere/base_model"  # what its export names
    assert saved["trainable_token_indices"]["embed_tokens"]  # the rows of the tokens the base never trained
    assert saved["trainable_token_indices"] == model.peft_config["default"].trainable_token_indices

    _, _, tensors = packed_demo_pairs(2)
    plain = PeftModel.from_pretrained(load_base_model(ModelConfig(name_or_path=base)), str(run / "adapter")).eval()
    with torch.no_grad():
        expected, off = token_logps_of(plain, tensors), None
        with plain.disable_adapter():
            off = token_logps_of(plain, tensors)
        ours = token_logps_of(model.eval(), tensors)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - off).abs().max() > 0.05  # the adapter's weights, not a new adapter's zero B

    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or "token_adapter" in name for name in trained)
    model.train()
    loss = -token_logps_of(model, tensors).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_preference_reference_is_the_adapter_it_started_from(started, precision):
    """Precomputed or inline, the reference is the model as the run starts: in bf16 to the last
    bit too (the adapter's fused LoRA layers and the 16-bit residual stream the trained model
    runs; PEFT's own bf16 forward moved each log-prob by up to 0.1)."""
    from ft_ray.train.modeling import build_model
    from ft_ray.train.preference import (REF_COLUMN, ReferenceScorer, adapter_off_reference, build_preference_objective,
                                         token_logps_of)
    from tests.unit.train.test_preference_objectives import packed_demo_pairs

    base, run = started
    job = with_adapter(config_from_dict(job_dict(base, objective="dpo", model={"adapter": str(run)},
                                                 lora={"dropout": 0.0}, train={"precision": precision})))
    model = build_model(job, base).eval()
    _, _, tensors = packed_demo_pairs(3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # as the engines run
    with torch.no_grad(), autocast:
        start = token_logps_of(model, tensors)
        off = adapter_off_reference(model, tensors)
    precomputed = ReferenceScorer(job.model_dump_json())({k: v.numpy() for k, v in tensors.items()})[REF_COLUMN]
    np.testing.assert_allclose(precomputed, start.numpy(), rtol=1e-5, atol=1e-4)
    assert np.abs(precomputed - off.numpy()).max() > 0.05

    inline = job.model_copy(update={"preference": job.preference.model_copy(update={"reference": "inline"})})
    objective = build_preference_objective(inline, model)
    with torch.no_grad(), autocast:
        loss, metrics = objective.loss(model, tensors)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # every reward 0 where training starts
    assert metrics["rewards_chosen"] == pytest.approx(0, abs=1e-4)


def test_what_a_continued_adapter_refuses(started, tmp_path):
    from ft_ray.data.prepared import fingerprint
    from ft_ray.models import model_source
    from ft_ray.plan import model_shape, plan_memory
    from ft_ray.train.modeling import build_model
    from ft_ray.tune import check_search_space

    base, run = started
    with pytest.raises(ConfigError, match=r"lora.rank: 16, but the adapter .* has 4: .* leave lora.rank out"):
        with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)}, lora={"rank": 16})))
    same = with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)},
                                                  lora={"rank": 4, "target_modules": ["v_proj", "q_proj"]})))
    assert same.lora.rank == 4  # the adapter's own settings, written out, are no conflict
    with pytest.raises(ConfigError, match="model.adapter: continues a LoRA adapter .* not method full"):
        config_from_dict(job_dict(base, method="full", model={"adapter": str(run)}))
    with pytest.raises(InputError, match="holds no LoRA adapter"):
        with_adapter(config_from_dict(job_dict(base, model={"adapter": str(tmp_path)})))
    with pytest.raises(InputError, match=r"is a LoRA adapter, not a model: .* model.adapter"):
        model_source(config_from_dict(job_dict(str(run / "adapter"))).model)
    sweep = with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)}, tune={
        "search_space": {"lora.rank": {"choice": [4, 8]}, "train.learning_rate": {"choice": [1e-4, 1e-3]}}})))
    with pytest.raises(ConfigError, match=r"tune.search_space.lora.rank: set by the adapter"):
        check_search_space(sweep)
    added = with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run), "add_tokens": ["<|new|>"]})))
    with pytest.raises(InputError, match="would train the rows of token ids \\[717\\]"):
        build_model(added, base)

    # DPO's precomputed reference log-probs are kept with the prepared data: the adapter is part of their key
    dpo = config_from_dict(job_dict(base, objective="dpo", model={"adapter": str(run)}))
    files = []
    assert fingerprint(with_adapter(dpo), files) != fingerprint(dpo.model_copy(update={"model": dpo.model.model_copy(
        update={"adapter": None})}), files)
    # an inline reference holds a copy of the base with the adapter beside the trained one
    inline = with_adapter(config_from_dict(job_dict(base, objective="dpo", model={"adapter": str(run)},
                                                    preference={"reference": "inline"})))
    shape = model_shape(inline)[0]
    parts = plan_memory(inline, shape).parts
    assert parts["reference_weights"] > parts["base_weights"]
    assert "reference_weights" not in plan_memory(with_adapter(dpo), shape).parts


@pytest.fixture(scope="module")
def continued(started, tmp_path_factory):
    """(the job that trained on from `started`'s adapter, the folder of where it took it: the
    adapter with noise added to every trained weight, saved as a run saves it)."""
    from ft_ray.train.modeling import build_model

    base, run = started
    job = with_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)}, lora={"dropout": 0.0},
                                                 eval={"max_new_tokens": 6})))
    variant = build_model(job, base)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in variant.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    folder = tmp_path_factory.mktemp("variant") / "adapter"
    variant.save_pretrained(folder, safe_serialization=True)
    return job, folder


def test_generate_compare_answers_with_the_adapter_it_trained_on_from_too(started, continued):
    from peft import PeftModel

    from ft_ray.generate import Answerer, Settings
    from ft_ray.models import generate, load_base_model

    (_, run), (job, variant) = started, continued
    answerer = Answerer(job, variant, Settings(max_new_tokens=12, compare=True))
    prompt = "### Instruction:\nReply to Ben.\n\n### Response:\n"
    answers = answerer.answer(prompt)
    assert set(answers) == {"variant", "start", "base"}
    for name, adapter in (("start", run / "adapter"), ("variant", variant)):
        alone = PeftModel.from_pretrained(load_base_model(job.model), str(adapter))
        assert answers[name] == generate(alone, answerer.tokenizer, prompt, 12).strip(), name
    assert len(set(answers.values())) == 3
    # model.adapter as a run names it (its folder, not the adapter's): the same start
    named_by_run = job.model_copy(update={"model": job.model.model_copy(update={"adapter": str(run)})})
    assert Answerer(named_by_run, variant, Settings(max_new_tokens=12, compare=True)).answer(prompt) == answers


def test_eval_without_the_adapter_it_trained_on_from_goes_on_without_that_arm(started, tmp_path, caplog):
    from ft_ray.evaluation.arms import arms_of
    from ft_ray.models import with_start_adapter

    base, run = started
    there = with_start_adapter(config_from_dict(job_dict(base, model={"adapter": str(run)})))
    assert there.model.adapter == str(run / "adapter") and "start" in [arm.name for arm in arms_of(there)]
    with caplog.at_level("WARNING", logger="ft_ray"):
        gone = with_start_adapter(config_from_dict(job_dict(base, model={"adapter": str(tmp_path / "sft")})))
    assert gone.model.adapter is None and "start" not in [arm.name for arm in arms_of(gone)]
    assert f"model.adapter: no folder {tmp_path / 'sft'}" in caplog.text and "compared without the adapter it trained on from" in caplog.text


def test_eval_compares_the_variant_with_the_adapter_it_trained_on_from(started, continued, caplog):
    """`ft-ray eval` of such a run scores one more arm, `start`: the adapter the run trained on
    from, beside the variant on the same base model (PEFT's second adapter), and decides the
    variant against it too."""
    from peft import PeftModel

    from ft_ray.evaluation.evaluate import print_result, summarize
    from ft_ray.evaluation.scoring import ArmScorer, record_key
    from ft_ray.models import load_base_model
    from tests.unit.evaluation.test_scoring import RECORD, score

    (_, run), (job, variant) = started, continued
    scorer = ArmScorer(job.model_dump_json(), str(variant), [], "instruction", {},
                       generate_keys=[record_key("eval.jsonl", 1)], arms=("base", "start", "variant"))
    rows = score(scorer, json.dumps(RECORD), json.dumps({**RECORD, "input": "From Kim: where is my order?"}))

    def loss_sum(adapter):
        model = load_base_model(job.model).eval()
        if adapter:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        one = copy.copy(scorer)  # its loss_sums on this model alone
        one.model = lambda arm: contextlib.nullcontext(model)
        examples = [scorer.prepare(json.dumps(RECORD), "")["base"]]
        return one.loss_sums(None, examples)[0][0]

    first = rows[0]
    assert first["start_loss_sum"] == pytest.approx(loss_sum(run / "adapter"), rel=1e-5)
    assert first["variant_loss_sum"] == pytest.approx(loss_sum(variant), rel=1e-5)
    assert first["base_loss_sum"] == pytest.approx(loss_sum(None), rel=1e-5)
    assert len({first["base_loss_sum"], first["start_loss_sum"], first["variant_loss_sum"]}) == 3
    assert first["start_answer"] and first["start_gen_tokens"] > 0  # answered, as every arm scored

    cols = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    for arm in ("few_shot", "retrieval"):  # not scored here: as if from a pass that did
        cols[f"{arm}_loss_sum"], cols[f"{arm}_tokens"] = cols["base_loss_sum"], cols["base_tokens"]
    result = summarize(job, cols, {"few_shot": 3, "retrieval": 3}, train_examples=500)
    assert list(result["arms"]) == ["base", "few_shot", "retrieval", "start", "variant"]
    sentence = result["comparisons"]["start"]["sentence"]
    assert "the adapter it trained on from" in sentence and "fine-tuning does not pay" not in sentence
    with caplog.at_level("INFO", logger="ft_ray"):
        print_result(result, "eval.json")
    assert "adapter start" in caplog.text and f"vs the adapter it trained on from: {sentence}" in caplog.text
