"""Distillation (objective distill): the divergences against their textbook formulas, the loss
from the head in chunks against the loss from both models' whole logits, and what the driver
refuses before a run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ft_ray.config import ConfigError, InputError, ModelConfig, config_from_dict
from ft_ray.data.records import encode_records
from ft_ray.data.tokenize import IGNORE_INDEX, pack_arrays
from ft_ray.models import load_tokenizer
from ft_ray.train.distillation import (CrossTokenizerTeacher, DistillLoss, SharedTokens, Teacher, check_teacher,
                                       divergence, load_teacher, matched_pairs, text_starts, uld)
from tests.conftest import DEMO, cross_tokenizer_llama, teacher_llama
from tests.unit.train.gradients import assert_same_gradients, objective_pass


def test_each_divergence_by_its_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11) * 2, torch.randn(5, 11) * 2
    p, q = teacher.softmax(-1), student.softmax(-1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731 - KL(a || b) of probabilities
    assert torch.allclose(divergence(student, teacher, "forward_kl"), kl(p, q), atol=1e-6)
    assert torch.allclose(divergence(student, teacher, "forward_kl"),
                          F.kl_div(q.log(), p, reduction="none").sum(-1), atol=1e-6)
    assert torch.allclose(divergence(student, teacher, "reverse_kl"), kl(q, p), atol=1e-6)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        assert torch.allclose(divergence(student, teacher, "jsd", beta), beta * kl(p, m) + (1 - beta) * kl(q, m),
                              atol=1e-6)
    # the symmetric JSD is at most log 2; every divergence is 0 where the two agree
    assert (divergence(student, teacher, "jsd", 0.5) <= math.log(2)).all()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(student, student + 3.0, kind).abs().max() < 1e-5  # (a shift changes no distribution)
        assert (divergence(student, teacher, kind) > 0).all()
    # uld: the L1 distance of the probabilities sorted, the shorter vocabulary padded with zeros; blind to
    # which token is which (a teacher of another tokenizer), 0 for the same distribution relabelled, at most 2
    wider = torch.randn(5, 17) * 2
    by_hand = (F.pad(q.sort(-1, descending=True).values, (0, 6)) - wider.softmax(-1).sort(-1, descending=True).values)
    assert torch.allclose(uld(student, wider), by_hand.abs().sum(-1), atol=1e-6)
    assert torch.allclose(uld(student, wider), uld(wider, student))
    assert uld(student, student[:, torch.randperm(11)] + 3.0).abs().max() < 1e-6
    assert ((uld(student, teacher) > 0) & (uld(student, teacher) <= 2)).all()
    # with tokens of the same text in both vocabularies (GOLD's hybrid): those compared token by token by the
    # generalized KL, sum of p log(p / q) - p + q, the rest sorted. The teacher's tokens 0-5 are the model's
    # 10, 2, 4, 6, 8, 0; its 6-16 and the model's others are not shared
    partner = torch.tensor([10, 2, 4, 6, 8, 0] + [-1] * 11)
    ours = torch.zeros(11, dtype=torch.bool)
    ours[[10, 2, 4, 6, 8, 0]] = True
    shared = SharedTokens(ours, partner)

    def hybrid(p: torch.Tensor) -> torch.Tensor:  # the teacher's probabilities over its 17 tokens
        kl = (torch.xlogy(p[:, :6], p[:, :6]) - p[:, :6] * q[:, partner[:6]].log() - p[:, :6] + q[:, partner[:6]])
        rest = F.pad(q[:, ~ours].sort(-1, descending=True).values, (0, 6)) - p[:, 6:].sort(-1, descending=True).values
        return kl.sum(-1) + rest.abs().sum(-1)

    assert torch.allclose(uld(student, wider, shared), hybrid(wider.softmax(-1)), atol=1e-5)
    # the teacher's top k in any order (its ids beside its logits: a precomputed teacher's), p zero past them
    order = torch.stack([torch.randperm(17) for _ in range(5)])
    assert torch.allclose(uld(student, wider.gather(-1, order), shared, order), hybrid(wider.softmax(-1)), atol=1e-5)
    top = wider.topk(4, dim=-1)
    p_top = torch.zeros(5, 17).scatter(-1, top.indices, top.values.softmax(-1))
    assert torch.allclose(uld(student, top.values, shared, top.indices), hybrid(p_top), atol=1e-5)
    # every token shared: forward_kl, which sees what sorting cannot: the same distribution, two tokens swapped
    everything = SharedTokens(torch.ones(11, dtype=torch.bool), torch.arange(11))
    assert torch.allclose(uld(student, teacher, everything), divergence(student, teacher, "forward_kl"), atol=1e-5)
    swapped = student[:, [1, 0, *range(2, 11)]]
    assert uld(student, swapped).abs().max() < 1e-6 and (uld(student, swapped, everything) > 0).all()


def packed_demo_rows() -> dict[str, torch.Tensor]:
    """The demo's first 6 records, encoded and packed in 2 rows of 256 tokens, as tensors."""
    tokenizer = load_tokenizer(ModelConfig())
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:6]
    batch = encode_records(lines, [""] * 6, "auto", {}, tokenizer, 256, None)
    packed = pack_arrays(batch.ids, batch.labels, batch.offsets, np.arange(6), 256, tokenizer.pad_token_id)
    assert len(packed["input_ids"]) >= 2
    return {k: torch.as_tensor(v[:2], dtype=torch.long) for k, v in packed.items()}


@pytest.mark.parametrize("method,precision,kind", [("lora", "fp32", "forward_kl"), ("qlora", "fp32", "jsd"),
                                                   ("full", "bf16", "jsd"), ("full", "fp32", "reverse_kl"),
                                                   ("full", "fp32", "uld")])
def test_distill_from_the_head_in_chunks_equals_distill_from_the_whole_logits(method, precision, kind, monkeypatch,
                                                                              tmp_path):
    """A teacher of another shape and a longer (padded) output layer (4-bit under QLoRA; for uld,
    one with its own tokenizer): the student's loss taken 50 rows at a time
    (fast_paths.chunked_lm_head, on by default) with the teacher's logits from its last hidden
    states gives the loss, metrics and every gradient (the trained output layer's too) that both
    models' whole logits give."""
    from ft_ray.train import fast_paths
    from ft_ray.train.modeling import build_model

    monkeypatch.setattr(fast_paths, "LOGITS_CHUNK_BYTES", 4 * 768 * 50)  # the tiny Llama's vocabulary: 768
    rows = packed_demo_rows()
    job = config_from_dict({"objective": "distill", "method": method, "model": {"max_seq_len": 256},
                            "distill": {"teacher": str(cross_tokenizer_llama(tmp_path / "teacher", permuted=False)
                                                       if kind == "uld" else teacher_llama(tmp_path / "teacher", wider=True)),
                                        "divergence": kind, "temperature": 2.0, "ratio": 0.7},
                            "data": {"train": "x.jsonl"}, "train": {"precision": precision},
                            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}})
    model = build_model(job, "builtin:tiny-llama")
    teacher = Teacher(load_teacher(job, torch.device("cpu")))
    assert teacher.head is not None and teacher.head.weight.shape[0] == (520 if kind == "uld" else 832)
    reader = teacher
    if kind == "uld":  # the student's target tokens without a teacher's match fall inside chunks
        reader = CrossTokenizerTeacher(teacher, load_tokenizer(job.model), load_tokenizer(job.teacher))
        partner = reader.teacher_batch(rows, rows["labels"][:, 1:] != IGNORE_INDEX)[2]
        assert 20 < int((partner >= 0).sum()) < len(partner) // 2
    if method == "qlora":  # in 4 bits, what is not quantized in the compute dtype (never trained: not fp32)
        assert any(type(m).__name__ == "Linear4bit" for m in teacher.model.modules())
        assert teacher.model.get_input_embeddings().weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad and method != "full":
            p.data.normal_(std=0.05)
    objective = DistillLoss(reader, kind, temperature=2.0, ratio=0.7)
    assert fast_paths.has_chunked_head(model)
    chunked = objective_pass(model, objective, rows, precision)
    causal = model.get_base_model() if method != "full" else model
    del causal.forward  # the model's own forward: the whole logits
    teacher.head = None  # the teacher's own forward too
    plain = objective_pass(model, objective, rows, precision)
    tokens = objective.weight(rows)
    assert tokens == int((rows["labels"][:, 1:] != IGNORE_INDEX).sum()) > 150  # more than 3 chunks
    rel = 1e-2 if precision == "bf16" else 1e-5
    divergence_mean, nll_mean = plain[1]["divergence"] / tokens, plain[1]["next_token_loss"] / tokens
    assert plain[0] == pytest.approx(0.7 * divergence_mean + 0.3 * nll_mean, rel=1e-5)
    assert divergence_mean > 0.01
    assert chunked[0] == pytest.approx(plain[0], rel=rel)
    assert chunked[1] == pytest.approx(plain[1], rel=rel)
    if method == "full":
        assert "lm_head.weight" in plain[2]
    assert_same_gradients(chunked[2], plain[2], rel)


def test_a_job_says_what_its_teacher_lacks(tmp_path):
    """Before any weights load: no teacher, one that is not a causal LM or not there, one with
    other tokens, a teacher for an objective that reads none, tokens added to the model."""
    base = {"objective": "distill", "data": {"train": "x.jsonl"}}
    with pytest.raises(ConfigError, match="distill.teacher: objective distill learns from a teacher"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="distill.teacher: read by objective distill, not sft"):
        config_from_dict({"data": {"train": "x.jsonl"}, "distill": {"teacher": "builtin:tiny-llama"}})
    with pytest.raises(ConfigError, match="model.add_tokens: the teacher has no such tokens"):
        config_from_dict({**base, "distill": {"teacher": "builtin:tiny-llama"}, "model": {"add_tokens": ["<x>"]}})

    tokenizer = load_tokenizer(ModelConfig())
    job = lambda teacher: config_from_dict({**base, "distill": {"teacher": str(teacher)}})  # noqa: E731
    assert check_teacher(job(teacher_llama(tmp_path / "ok")), tokenizer).startswith(
        f"distill: teacher {tmp_path / 'ok'} (forward_kl, temperature 1, ratio 0.5)")
    sharded = config_from_dict({**base, "distill": {"teacher": str(tmp_path / "ok")},
                                "distributed": {"strategy": "fsdp"}})
    assert check_teacher(sharded, tokenizer) == (f"distill: teacher {tmp_path / 'ok'} (forward_kl, temperature 1, "
                                                 "ratio 0.5, sharded across the workers as the model is)")
    with pytest.raises(InputError, match=r"distill.teacher: no folder .*/missing"):
        check_teacher(job(tmp_path / "missing"), tokenizer)
    other = teacher_llama(tmp_path / "other")
    extra = load_tokenizer(ModelConfig())
    extra.add_tokens(["<|tool|>"], special_tokens=True)
    extra.save_pretrained(other)
    with pytest.raises(InputError, match=r"tokenizer is not the model's \(717 tokens against 716; first differing: "
                                         r"'<\|tool\|>': 716\)"):
        check_teacher(job(other), tokenizer)
    classifier = teacher_llama(tmp_path / "classifier")
    config = (classifier / "config.json")
    config.write_text(config.read_text().replace("LlamaForCausalLM", "LlamaForSequenceClassification"))
    with pytest.raises(InputError, match="is LlamaForSequenceClassification; a teacher is a causal LM"):
        check_teacher(job(classifier), tokenizer)


def test_a_teacher_with_its_own_tokenizer_reads_the_same_text_and_teaches_by_uld(tmp_path):
    """divergence uld: the driver takes a teacher of another tokenizer (and says so); the
    teacher reads each packed example's text in its own tokens. The built-in model under
    renumbered token ids (`cross_tokenizer_llama`) reads the same tokens relabelled: every
    trained token is matched and the divergence is 0 (its distributions are the model's), on
    the records' answers and on the model's own sampled ones (on_policy). One as sure as the
    model but of other tokens is invisible to plain ULD (sorted, the same) and taught by the
    tokens the vocabularies share (`uld_shared_tokens`). A teacher of another BPE reads the
    same text too, in other tokens, each matched token of the model's read after the same text
    as the teacher's, and a few steps of the model towards it lower the divergence."""
    from ft_ray.train.distillation import build_distill_objective
    from ft_ray.train.modeling import build_model

    rows = packed_demo_rows()
    keep = rows["labels"][:, 1:] != IGNORE_INDEX
    tokenizer = load_tokenizer(ModelConfig())
    job = lambda teacher, **distill: config_from_dict({  # noqa: E731
        "objective": "distill", "method": "full", "model": {"max_seq_len": 256}, "data": {"train": "x.jsonl"},
        "train": {"precision": "fp32"}, "distill": {"teacher": str(teacher), "ratio": 1.0, **distill}})
    relabelled = cross_tokenizer_llama(tmp_path / "relabelled")
    with pytest.raises(InputError, match=r"tokenizer is not the model's .*, or set distill.divergence: uld"):
        check_teacher(job(relabelled), tokenizer)
    assert check_teacher(job(relabelled, divergence="uld"), tokenizer) == (
        f"distill: teacher {relabelled} (uld, its own tokenizer (716 tokens), 716 of its tokens also the model's, "
        "compared token by token, the others sorted, temperature 1, ratio 1)")

    model = build_model(job(relabelled, divergence="uld"), "builtin:tiny-llama")
    objective = build_distill_objective(job(relabelled, divergence="uld"), model)
    read, teacher_keep, partner = objective.teacher.teacher_batch(rows, keep)
    theirs = load_tokenizer(job(relabelled).teacher)
    assert (partner == torch.arange(int(keep.sum()))).all()  # each target token, in order
    for ours, read_ids in zip(rows["input_ids"], read["input_ids"]):
        text = tokenizer.decode([t for t in ours.tolist() if t != tokenizer.pad_token_id])
        assert theirs.decode([t for t in read_ids.tolist() if t != theirs.pad_token_id]) == text
    loss, metrics = objective.loss(model, rows)
    assert metrics["divergence"] / objective.weight(rows) < 1e-5 and metrics["next_token_loss"] > 100
    # on-policy (GKD's, GOLD's): the model's own sampled answers, read back and graded in the teacher's tokens
    from tests.unit.train.test_grpo import demo_batch

    on_policy = job(relabelled, divergence="uld", on_policy=1.0, max_new_tokens=16)  # one record per row
    answering = build_model(on_policy, "builtin:tiny-llama").train()
    sampling = build_distill_objective(on_policy, answering)
    prompts = {**demo_batch(tokenizer), "seq_id": torch.arange(4)}
    sampled = sampling.step_weights(answering, [prompts])[0]
    _, metrics = sampling.loss(answering, prompts)
    assert metrics["on_policy"] == sampled > 8 and metrics["divergence"] / sampled < 1e-4
    # as sure as the model, of other tokens: plain ULD (sorted) sees nothing; the shared tokens teach it
    shuffled = cross_tokenizer_llama(tmp_path / "shuffled", shuffled=True)
    plain = build_distill_objective(job(shuffled, divergence="uld", uld_shared_tokens=False), model)
    assert plain.loss(model, rows)[1]["divergence"] < 1e-3
    hybrid = build_distill_objective(job(shuffled, divergence="uld"), model)
    student = build_model(job(shuffled, divergence="uld"), "builtin:tiny-llama")
    seen = [total / hybrid.weight(rows) for total in divergences_while_training(hybrid, student, rows, 4)]
    assert seen[0] > 5 and seen[-1] < 0.7 * seen[0], seen

    other = job(cross_tokenizer_llama(tmp_path / "other", permuted=False), divergence="uld")
    objective = build_distill_objective(other, model)
    read, teacher_keep, partner = objective.teacher.teacher_batch(rows, keep)
    theirs = load_tokenizer(other.teacher)
    assert read["input_ids"].shape[1] != rows["input_ids"].shape[1] and 20 < int((partner >= 0).sum()) < len(partner)
    assert int(teacher_keep.sum()) == int((partner >= 0).sum())
    positions = rows["position_ids"][0].tolist()
    starts = [i for i, at in enumerate(positions) if at == 0] + [len(positions)]
    for s, e in zip(starts, starts[1:]):  # each matched pair: both predicted after the same text
        ids = rows["input_ids"][0, s:e].tolist()
        read_back, pieces = objective.teacher.teacher_example(ids, (rows["labels"][0, s:e] != IGNORE_INDEX).tolist())
        for a, b in matched_pairs(pieces):
            assert tokenizer.decode(ids[:a], skip_special_tokens=True) == theirs.decode(read_back[:b],
                                                                                         skip_special_tokens=True)
    for ours, read_ids in zip(rows["input_ids"], read["input_ids"]):  # the same text, bos and eos the teacher's
        text = tokenizer.decode(ours.tolist(), skip_special_tokens=True)
        assert theirs.decode(read_ids.tolist(), skip_special_tokens=True) == text
        assert (read_ids == theirs.eos_token_id).sum() == (ours == tokenizer.eos_token_id).sum()
    # a SentencePiece model (its word mark opens a text, not each piece read back) taught by the built-in tokens
    from tests.conftest import sentencepiece_tokenizer

    spm = sentencepiece_tokenizer()
    record = encode_records((DEMO / "train.jsonl").read_text().splitlines()[:1], [""], "auto", {}, spm, 256, None)
    read_back, _ = CrossTokenizerTeacher(None, spm, tokenizer).teacher_example(
        record.ids.tolist(), (record.labels != IGNORE_INDEX).tolist())
    assert tokenizer.decode(read_back) == "<|begin|>" + spm.decode(record.ids, skip_special_tokens=True) + "<|end|>"
    # where each token's text starts (None inside a character of several bytes), as the text of the tokens before it
    for reader in (tokenizer, theirs, spm):
        ids = reader("Héllo wörld — “quoted” 日本語, ünïcödé!", add_special_tokens=False)["input_ids"] * 2
        before = [reader.decode(ids[:k], clean_up_tokenization_spaces=False) for k in range(len(ids))]
        assert text_starts(reader, ids) == [None if text.endswith("\ufffd") else len(text) for text in before]

    seen = divergences_while_training(objective, model, rows, 6)
    assert seen[-1] < 0.7 * seen[0], seen


def divergences_while_training(objective: DistillLoss, model, rows: dict[str, torch.Tensor], steps: int) -> list[float]:
    """The divergence (summed over the target tokens) at each of `steps` AdamW steps (lr 1e-3)
    of `model` on `rows`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(steps):
        loss, metrics = objective.loss(model, rows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(metrics["divergence"])
    return seen


def test_on_policy_batches_train_on_the_models_own_answers_graded_by_the_teacher(tmp_path):
    """distill.on_policy: a batch drawn to be on-policy is answered by the model itself before
    the step (its sampled answers, the same for the same sequence ids: a resumed run samples as
    the uninterrupted one did), its weight is their tokens, and its loss is the divergence alone
    over them; the other batches train on the records' answers as without on_policy. The draw
    follows the sequence ids and takes about the share asked."""
    from ft_ray.models import load_base_model
    from ft_ray.train.distillation import batch_key, build_distill_objective
    from tests.unit.train.test_grpo import demo_batch

    job = config_from_dict({"objective": "distill", "data": {"train": "x.jsonl"},
                            "distill": {"teacher": str(teacher_llama(tmp_path / "teacher")), "on_policy": 0.5,
                                        "ratio": 0.3, "max_new_tokens": 12}})
    assert not job.data.pack  # one record per row: the model is asked each prompt
    model = load_base_model(job.model).train()  # (evaluation never samples)
    objective = build_distill_objective(job, model)
    assert objective.metrics == ("divergence", "next_token_loss", "on_policy")
    batch = demo_batch(load_tokenizer(job.model))
    batches = [{**batch, "seq_id": torch.arange(4 * i, 4 * i + 4)} for i in range(200)]
    draws = objective.chosen(batches)
    assert 0.4 < sum(draws) / 200 < 0.6 and objective.chosen(batches) == draws
    sampled, kept = batches[draws.index(True)], batches[draws.index(False)]

    weights = objective.step_weights(model, [sampled, kept])
    assert list(objective.answered) == [batch_key(sampled)]
    answered = objective.answered[batch_key(sampled)]
    prompts, _ = objective.sampler.prompts_of(batch)
    again = objective.sampler.sample(model, prompts, 1, True, objective.sampler.sampling_seed(sampled))
    assert answered["input_ids"].tolist() == objective.sampler.answer_batch(prompts, again, 1, "cpu")["input_ids"].tolist()
    assert weights == [objective.weight(answered), objective.weight(kept)] and weights[0] != weights[1]
    on, metrics = objective.loss(model, sampled)
    alone, alone_metrics = objective.divergence_loss(model, answered, 1.0)
    assert on.item() == pytest.approx(alone.item()) and on.item() == pytest.approx(
        alone_metrics["divergence"] / weights[0])
    assert metrics["on_policy"] == weights[0] == objective.weight(sampled)  # the log window weighs it so
    off, metrics = objective.loss(model, kept)
    assert off.item() == pytest.approx(objective.divergence_loss(model, kept, 0.3)[0].item())
    assert metrics["on_policy"] == 0.0


def test_precomputed_teacher_logits_give_the_inline_loss_over_the_whole_vocabulary(tmp_path):
    """distill.teacher_logits: precomputed: a model actor's pass (`TeacherScorer`) keeps the
    teacher's top_k tokens and logits at each target token, nothing elsewhere; with k the
    whole vocabulary the two models share, the loss, metrics and gradients are those of the
    teacher run inline (fp16 logits in storage), and a smaller k keeps the teacher's likeliest
    tokens; for uld (a teacher of another tokenizer) the same. The job refuses what needs the
    teacher's whole distribution or the teacher itself."""
    from ft_ray.data.prepared import fingerprint
    from ft_ray.train.distillation import TEACHER_IDS, TEACHER_LOGITS, TeacherScorer, build_distill_objective
    from ft_ray.train.loop import model_inputs
    from ft_ray.train.modeling import build_model

    rows = packed_demo_rows()
    teacher = str(teacher_llama(tmp_path / "teacher"))  # 832 output rows, the model 768
    settings = {"objective": "distill", "model": {"max_seq_len": 256}, "data": {"train": "x.jsonl"},
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
    distill = {"teacher": teacher, "temperature": 2.0, "ratio": 0.7}
    job = lambda **more: config_from_dict({**settings, "distill": {**distill, **more}})  # noqa: E731
    keep = rows["labels"][:, 1:] != IGNORE_INDEX
    inline_teacher = Teacher(load_teacher(job(), torch.device("cpu")))
    full = inline_teacher.at(rows, keep)(0, int(keep.sum()))[:, :768]

    precomputed = job(teacher_logits="precomputed", top_k=768)
    scored = TeacherScorer(precomputed.model_dump_json())({k: v.numpy() for k, v in rows.items()})
    assert scored[TEACHER_IDS].shape == scored[TEACHER_LOGITS].shape == (2, 256, 768)
    assert not scored[TEACHER_LOGITS][:, :-1][~keep.numpy()].any() and not scored[TEACHER_LOGITS][:, -1].any()
    batch = model_inputs({k: torch.as_tensor(v) for k, v in scored.items()})
    model = build_model(precomputed, "builtin:tiny-llama")
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.05)
    objective = build_distill_objective(precomputed, model)
    assert objective.columns[-2:] == (TEACHER_IDS, TEACHER_LOGITS)
    got = objective_pass(model, objective, batch, "fp32")
    expected = objective_pass(model, DistillLoss(inline_teacher, "forward_kl", 2.0, 0.7), rows, "fp32")
    assert got[0] == pytest.approx(expected[0], rel=1e-3) and got[1] == pytest.approx(expected[1], rel=1e-3)
    assert_same_gradients(got[2], expected[2], 1e-3)

    few = TeacherScorer(job(teacher_logits="precomputed", top_k=4).model_dump_json())(
        {k: v.numpy() for k, v in rows.items()})
    top = full.topk(4, dim=-1)
    assert (torch.as_tensor(few[TEACHER_IDS][:, :-1][keep.numpy()]) == top.indices).float().mean() > 0.99
    torch.testing.assert_close(torch.as_tensor(few[TEACHER_LOGITS][:, :-1][keep.numpy()]).float(), top.values,
                               atol=0.02, rtol=1e-3)
    # kept with the prepared data: the teacher's files and top_k are part of its key (an inline teacher is not)
    keys = [fingerprint(config, []) for config in (job(), precomputed, job(teacher_logits="precomputed", top_k=4))]
    assert len(set(keys)) == 3 and keys[0] == fingerprint(config_from_dict({**settings, "distill": {
        **distill, "teacher": str(teacher_llama(tmp_path / "another"))}}), [])
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"changed")
    assert fingerprint(precomputed, []) != keys[1]
    # uld (a teacher of another tokenizer): its top tokens in its own ids, -inf where nothing matched; with k its
    # whole vocabulary the inline teacher's loss, metrics and gradients, its shared tokens compared or not
    other = str(cross_tokenizer_llama(tmp_path / "other", permuted=False))  # 520 tokens
    sorted_job = lambda **more: job(teacher=other, divergence="uld", **more)  # noqa: E731
    scored = TeacherScorer(sorted_job(teacher_logits="precomputed", top_k=520).model_dump_json())(
        {k: v.numpy() for k, v in rows.items()})
    assert scored[TEACHER_IDS].shape == scored[TEACHER_LOGITS].shape == (2, 256, 520)
    taught = torch.as_tensor(scored[TEACHER_LOGITS][:, :-1][keep.numpy()])
    unmatched = ~taught[:, 0].isfinite()
    assert 0 < int((~unmatched).sum()) < len(taught) and taught[unmatched].isneginf().all()
    scored_batch = model_inputs({k: torch.as_tensor(v) for k, v in scored.items()})
    for shares in (True, False):
        inline = build_distill_objective(sorted_job(uld_shared_tokens=shares), model)
        objective = build_distill_objective(sorted_job(teacher_logits="precomputed", top_k=520,
                                                       uld_shared_tokens=shares), model)
        assert objective.columns[-2:] == (TEACHER_IDS, TEACHER_LOGITS)
        got = objective_pass(model, objective, scored_batch, "fp32")
        expected = objective_pass(model, inline, rows, "fp32")
        assert got[0] == pytest.approx(expected[0], rel=1e-3) and got[1] == pytest.approx(expected[1], rel=1e-3)
        assert_same_gradients(got[2], expected[2], 1e-3)
    assert fingerprint(sorted_job(teacher_logits="precomputed", top_k=4), []) != fingerprint(
        job(teacher=other, teacher_logits="precomputed", top_k=4), [])  # the same teacher, its logits kept otherwise
    with pytest.raises(ConfigError, match="distill.on_policy: the teacher grades the model's own answers"):
        job(teacher_logits="precomputed", on_policy=0.5)
    with pytest.raises(ConfigError, match="distill.divergence: jsd needs the teacher's whole distribution"):
        job(teacher_logits="precomputed", divergence="jsd")
