"""The preference losses against hand-computed values (and TRL's documented formulas), and
the answer log-probs of a packed row against each sequence scored on its own."""

import math

import numpy as np
import pytest
import torch

from ft_ray.config import ModelConfig, config_from_dict
from ft_ray.data.formats import CHOSEN, REJECTED
from ft_ray.data.records import encode_records
from ft_ray.data.tokenize import IGNORE_INDEX, pack_arrays
from ft_ray.models import load_base_model, load_tokenizer
from ft_ray.train.attention import register
from ft_ray.train.preference import answer_sums, dpo_loss, kto_loss, orpo_odds_ratio, simpo_loss, token_logps_of
from tests.conftest import DEMO
from tests.unit.train.gradients import assert_same_gradients, objective_pass


def test_dpo_loss_by_hand_and_by_trls_formula():
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 1: log-ratios +1 (chosen) and -1 (rejected): -log sigmoid(0.5 * 2) = log(1 + e^-1)
    # pair 2: log-ratios -1 and +1: -log sigmoid(-1) = log(1 + e)
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.e)]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5]))
    # TRL (DPOTrainer, loss_type sigmoid, label_smoothing 0): logits = (pi_c - pi_r) - (ref_c - ref_r)
    trl = -torch.nn.functional.logsigmoid(0.5 * ((chosen - rejected) - (ref_chosen - ref_rejected)))
    torch.testing.assert_close(losses, trl)


def test_orpo_odds_ratio_by_hand():
    chosen_mean, rejected_mean = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ratio, log_odds = orpo_odds_ratio(chosen_mean, rejected_mean, beta=0.2)
    # odds(0.5) = 1, odds(0.25) = 1/3: log odds ratio = log 3; beta * log sigmoid(log 3) = 0.2 * log(3/4)
    torch.testing.assert_close(log_odds, torch.tensor([math.log(3)]))
    torch.testing.assert_close(ratio, torch.tensor([0.2 * math.log(0.75)]))


def test_kto_loss_by_hand():
    ratios, good = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([True, False, False])
    losses, z0 = kto_loss(ratios, good, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert abs(z0.item() - 2 / 3) < 1e-6  # the batch's mean log-ratio (at least 0)
    sig = torch.sigmoid
    expected = torch.stack([1 - sig(torch.tensor(1 - 2 / 3)), 2 * (1 - sig(torch.tensor(2 / 3 + 1))),
                            2 * (1 - sig(torch.tensor(2 / 3 - 2)))])
    torch.testing.assert_close(losses, expected)
    _, z0 = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([True, False]), 1.0, 1.0, 1.0)
    assert z0.item() == 0.0


def packed_demo_pairs(pairs: int):
    """(the tiny model with per-example attention, the demo's first pairs encoded, packed in one row as tensors)."""
    tokenizer = load_tokenizer(ModelConfig())
    model = load_base_model(ModelConfig()).eval()
    model.set_attn_implementation(register())
    lines = (DEMO / "preference-train.jsonl").read_text().splitlines()[:pairs]
    batch = encode_records(lines, [""] * pairs, "auto", {}, tokenizer, 512, None)
    packed = pack_arrays(batch.ids, batch.labels, batch.offsets, np.arange(pairs), 1024, tokenizer.pad_token_id,
                         roles=batch.roles)
    assert len(packed["input_ids"]) == 1  # all the pairs in one row
    return model, batch, {k: torch.as_tensor(v, dtype=torch.long) for k, v in packed.items()}


def test_answer_logps_of_a_packed_row_equal_each_sequence_scored_alone():
    model, batch, tensors = packed_demo_pairs(3)
    with torch.no_grad():
        answers = answer_sums(token_logps_of(model, tensors), tensors)
        alone = []
        role_starts = np.flatnonzero(np.diff(batch.roles, prepend=0) != 0)
        for start, end in zip(role_starts, [*role_starts[1:], len(batch.ids)]):
            ids = torch.as_tensor(batch.ids[start:end], dtype=torch.long)[None]
            labels = torch.as_tensor(batch.labels[start:end], dtype=torch.long)
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            kept = labels[1:] != IGNORE_INDEX
            alone.append(logps[kept].gather(1, labels[1:][kept][:, None]).sum())
    chosen, chosen_tokens = answers.of(CHOSEN)
    rejected, _ = answers.of(REJECTED)
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).reshape(-1), torch.stack(alone),
                               rtol=1e-4, atol=1e-3)
    assert chosen_tokens.tolist() == [int((batch.labels[s:e] != IGNORE_INDEX).sum()) for s, e in
                                      zip(role_starts[::2], role_starts[1::2])]


def test_dpo_with_a_chosen_nll_weight_adds_the_chosen_answers_next_token_loss():
    from ft_ray.train.objectives import NextTokenLoss
    from ft_ray.train.preference import DPOLoss

    model, _, tensors = packed_demo_pairs(2)
    same_model = token_logps_of  # the policy is its own reference: every reward is 0
    with torch.no_grad():
        plain, metrics = DPOLoss(0.1, same_model).loss(model, tensors)
        rpo, rpo_metrics = DPOLoss(0.1, same_model, chosen_nll_weight=0.5).loss(model, tensors)
        chosen_only = dict(tensors, labels=torch.where(tensors["roles"] == CHOSEN, tensors["labels"], IGNORE_INDEX))
        nll, _ = NextTokenLoss().loss(model, chosen_only)
    assert plain.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["reward_accuracy"] == 0
    assert rpo.item() == pytest.approx(math.log(2) + 0.5 * nll.item(), rel=1e-4)
    assert rpo_metrics["nll_loss"] / 2 == pytest.approx(nll.item(), rel=1e-4)  # summed over the 2 pairs


def test_precomputed_reference_log_probs_equal_the_inline_ones():
    from ft_ray.config import config_from_dict
    from ft_ray.train.preference import REF_COLUMN, DPOLoss, ReferenceScorer

    model, _, tensors = packed_demo_pairs(3)
    job = config_from_dict({"objective": "dpo", "model": {"max_seq_len": 1024}, "data": {"train": "x.jsonl"}})
    assert job.precomputes_reference  # the default
    rows = ReferenceScorer(job.model_dump_json())({k: v.numpy() for k, v in tensors.items()})
    assert rows[REF_COLUMN].dtype == np.float32 and rows[REF_COLUMN].shape == tuple(tensors["input_ids"].shape)
    precomputed = DPOLoss(0.1, None).reference_answers(None, {**tensors, REF_COLUMN: torch.as_tensor(rows[REF_COLUMN])})
    with torch.no_grad():
        inline = answer_sums(token_logps_of(model, tensors), tensors)
    torch.testing.assert_close(precomputed.logps, inline.logps, rtol=1e-5, atol=1e-4)
    assert precomputed.tokens.tolist() == inline.tokens.tolist() and (precomputed.logps < 0).sum() == 6


@pytest.mark.parametrize("method,precision,untrained", [("full", "fp32", False), ("lora", "bf16", False),
                                                        ("lora", "fp32", True)])
def test_dpo_from_the_head_in_chunks_equals_dpo_from_the_whole_logits(method, precision, untrained, monkeypatch,
                                                                      tmp_path):
    """The policy's (and, for LoRA, the adapter-off reference's) log-probs from the head taken
    100 rows at a time (fast_paths.chunked_lm_head, on by default) give the loss, metrics and
    every gradient the model's own logits give; also with the trained rows of special tokens the
    base never trained (the eos ends every answer), which the reference does without."""
    from ft_ray.config import config_from_dict
    from ft_ray.train import fast_paths
    from ft_ray.train.modeling import build_model
    from ft_ray.train.preference import REF_COLUMN, DPOLoss, adapter_off_reference
    from tests.conftest import untrained_llama

    monkeypatch.setattr(fast_paths, "LOGITS_CHUNK_BYTES", 4 * 768 * 100)  # the tiny Llama's vocabulary: 768
    _, _, tensors = packed_demo_pairs(3)
    base = str(untrained_llama(tmp_path / "base")) if untrained else "builtin:tiny-llama"
    job = config_from_dict({"objective": "dpo", "method": method, "model": {"max_seq_len": 1024, "name_or_path": base},
                            "data": {"train": "x.jsonl"}, "train": {"precision": precision},
                            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}})
    model = build_model(job, base)
    causal = model.get_base_model() if method == "lora" else model
    assert fast_paths.has_chunked_head(model)
    if untrained:  # the head's rows come apart from it, not from a copy of the whole head
        assert fast_paths.head_parts(model.get_output_embeddings())[1] is not None
        assert (tensors["input_ids"] == 2).sum() >= 6
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad and method == "lora":
            p.data.normal_(std=0.05)  # an adapter that changes the answers' log-probs
    if method == "lora":
        objective = DPOLoss(0.5, adapter_off_reference)
    else:
        objective = DPOLoss(0.5, None)
        with torch.no_grad():  # the reference log-probs precomputed: the base's, a little off
            tensors[REF_COLUMN] = token_logps_of(model, tensors) - 0.01 * tensors["roles"]
    chunked = objective_pass(model, objective, tensors, precision)
    del causal.forward  # the model's own forward: the whole logits
    assert not fast_paths.has_chunked_head(model)
    plain = objective_pass(model, objective, tensors, precision)
    rel = 1e-2 if precision == "bf16" else 1e-5
    assert chunked[0] == pytest.approx(plain[0], rel=rel) and chunked[0] != pytest.approx(math.log(2), rel=1e-3)
    assert chunked[1] == pytest.approx(plain[1], rel=rel, abs=1e-3)
    # (the eos ends each answer: its embedding's row is read by nothing after it)
    assert_same_gradients(chunked[2], plain[2], rel, unread=("embed_tokens.token_adapter",))


def test_simpo_loss_by_hand_and_by_trls_formula():
    chosen_mean, rejected_mean = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    losses = simpo_loss(chosen_mean, rejected_mean, beta=2.0, gamma=0.5)
    # pair 1: 2 * 0.5 - 0.5 = 0.5; pair 2: 2 * -1 - 0.5 = -2.5
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(2.5))]))
    # TRL (CPOTrainer, loss_type simpo): logits = (pi_c - pi_r) - simpo_gamma / beta; -logsigmoid(beta * logits)
    trl = -torch.nn.functional.logsigmoid(2.0 * ((chosen_mean - rejected_mean) - 0.5 / 2.0))
    torch.testing.assert_close(losses, trl)


def test_simpo_job_trains_its_pairs_apart_without_a_reference():
    """objective: simpo (beta 2.0 unless set): its loss is the formula's on each pair's mean
    log-probs, and a few steps on the demo's pairs raise the chosen answers over the rejected."""
    from ft_ray.config import config_from_dict
    from ft_ray.train.objectives import build_objective
    from ft_ray.train.preference import SimPOLoss

    job = config_from_dict({"objective": "simpo", "method": "full", "data": {"train": "x.jsonl"}})
    assert (job.preference.beta, job.preference.simpo_gamma) == (2.0, 0.5) and not job.precomputes_reference
    assert config_from_dict({**job.model_dump(), "preference": {"beta": 3.0}}).preference.beta == 3.0
    model, _, tensors = packed_demo_pairs(4)
    objective = build_objective(job, model)
    assert isinstance(objective, SimPOLoss) and objective.reference is None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    margins = []
    for _ in range(4):
        loss, metrics = objective.loss(model, tensors)
        answers = answer_sums(token_logps_of(model, tensors), tensors)
        (pc, nc), (pr, nr) = answers.of(CHOSEN), answers.of(REJECTED)
        expected = simpo_loss(pc / nc, pr / nr, 2.0, 0.5).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        margins.append(metrics["reward_margin"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margins[-1] > margins[0] + 1


def test_dpo_loss_variants_by_trls_formulas():
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)  # +2 and -2
    ipo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "ipo")
    torch.testing.assert_close(ipo, (logits - 1 / (2 * 0.5)) ** 2)  # (2 - 1)^2, (-2 - 1)^2
    torch.testing.assert_close(ipo, torch.tensor([1.0, 9.0]))
    hinge, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.0, 2.0]))  # max(0, 1 - 0.5 * 2), max(0, 1 + 0.5 * 2)
    smoothed, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "sigmoid", label_smoothing=0.1)
    log_sigmoid = torch.nn.functional.logsigmoid
    torch.testing.assert_close(smoothed, -0.9 * log_sigmoid(0.5 * logits) - 0.1 * log_sigmoid(-0.5 * logits))


def test_ipo_takes_mean_log_probs_per_token_and_the_job_names_its_loss():
    from ft_ray.config import ConfigError, config_from_dict
    from ft_ray.train.objectives import build_objective

    model, _, tensors = packed_demo_pairs(2)
    job = config_from_dict({"objective": "dpo", "preference": {"loss_type": "ipo", "beta": 0.5,
                                                               "reference": "inline"},
                            "method": "full", "data": {"train": "x.jsonl"}})
    objective = build_objective(job, model)
    assert (objective.loss_type, objective.beta) == ("ipo", 0.5)
    objective.reference = lambda model, batch: torch.zeros(batch["input_ids"].shape)  # log-probs 0: margins are the policy's
    with torch.no_grad():
        loss, _ = objective.loss(model, tensors)
        answers = answer_sums(token_logps_of(model, tensors), tensors)
    (pc, nc), (pr, nr) = answers.of(CHOSEN), answers.of(REJECTED)
    assert loss.item() == pytest.approx(((pc / nc - pr / nr - 1 / (2 * 0.5)) ** 2).mean().item(), rel=1e-4)
    with pytest.raises(ConfigError, match="preference.loss_type / label_smoothing: variants of dpo's loss, not of "
                                          "objective orpo"):
        config_from_dict({"objective": "orpo", "preference": {"loss_type": "hinge"}, "data": {"train": "x.jsonl"}})


def test_an_inline_reference_is_made_on_the_workers_device_not_where_the_policy_is_yet():
    """DDP moves the policy to the worker's GPU in its engine, after the objective and its
    reference are made: the frozen copy goes to the worker's device (`engine_api.worker_device`),
    not to the policy's (before, a GPU run's reference stayed on the CPU). Here the policy sits
    on the meta device; the reference answers on this worker's CPU."""
    from ft_ray.train.modeling import build_model
    from ft_ray.train.preference import inline_reference

    config = config_from_dict({"method": "full", "objective": "dpo", "data": {"train": "t.jsonl"},
                               "preference": {"reference": "inline"}})
    policy = build_model(config, "builtin:tiny-llama").to("meta")
    reference = inline_reference(config, policy)
    assert {p.device.type for p in reference.model.parameters()} == {"cpu"}
    ids = torch.randint(3, 700, (1, 16))
    logps = reference(policy, {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16)[None]})
    assert logps.shape == (1, 16) and bool((logps[:, 1:] < 0).all())
