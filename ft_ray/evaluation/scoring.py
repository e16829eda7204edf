"""The arms (`arms.arms_of`) on a batch of held-out records: the base model with the plain
prompt, the base model with the first training examples before the prompt (few-shot), the
base model with the most similar training examples before it (retrieval), the adapter a
run trained on from (`model.adapter`, the `start` arm), a distillation run's teacher and the
fine-tuned variant.

`ArmScorer` is what a Ray Data actor holds (one model copy per actor), but nothing here
needs Ray: it takes a batch of raw records and returns one row of figures per record.
Target tokens are masked exactly as in training (`record_to_segments` + `assemble`), so
every arm's loss is on the same tokens. The prompting arms' examples fit the base model's
context (`eval.max_prompt_tokens`), not the training sequence length. A preference pair is
scored on its chosen answer (the reference of the generation metrics) and, for the
preference accuracy, on its rejected answer too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ft_ray.config import JobConfig, ModelConfig
from ft_ray.data.formats import RecordError, reasoning_end
from ft_ray.data.records import record_to_units
from ft_ray.data.tokenize import (IGNORE_INDEX, answer_text, assemble, bos_id, encode_batch, encode_segments,
                                 without_word_mark)
from ft_ray.evaluation import metrics
from ft_ray.evaluation.arms import ARM_NAMES, PROMPTING, Arm, Retriever, arms_of
from ft_ray.models import load_start_adapter, start_adapter_on
from ft_ray.storage import local_folder

SHOT_SEPARATOR = "\n\n"


def shot_text(segments: list[tuple[str, bool]], eos: str) -> str:
    """A training example as it appears in a few-shot prompt: prompt and answer, no eos."""
    text = "".join(t for t, _ in segments)
    return (text.replace(eos, "") if eos else text).strip() + SHOT_SEPARATOR


def record_key(path: str, line: int) -> str:
    return f"{path}:{int(line)}"


def arm_dtype(job: JobConfig) -> Any:
    """The arms' weights: bf16 on a GPU actor when the job trains in bf16, else fp32."""
    import torch

    gpu = job.distributed.use_gpu and torch.cuda.is_available()
    return torch.bfloat16 if gpu and job.train.precision == "bf16" else torch.float32


def arm_placed(job: JobConfig, model: Any) -> Any:
    """A model on the GPU of a GPU actor, in eval mode."""
    import torch

    return (model.to("cuda") if job.distributed.use_gpu and torch.cuda.is_available() else model).eval()


def load_teacher_arm(job: JobConfig) -> Any:
    """A distillation run's teacher as the teacher arm runs it: as the arms' models are (4-bit
    under QLoRA, as training held it), its own RoPE."""
    from ft_ray.models import load_base_model, load_quantized_model

    if job.method == "qlora":
        return load_quantized_model(job.teacher, job.quantization, False, frozen=True).eval()
    return arm_placed(job, load_base_model(job.teacher, arm_dtype(job)))


def load_arms(job: JobConfig, variant: Path, base_arms: bool = True, start: bool = False) -> tuple[Any, Any, bool]:
    """(base model, variant model, shared): for an adapter the variant is the base model with
    the adapter attached (shared: the base arms run with the adapter disabled; with `start`,
    the adapter the run trained on from, `model.adapter`, beside it as PEFT's "start"); a full
    model folder is loaded on its own, and the base model beside it only for `base_arms`
    (None otherwise: a second copy of the weights no arm reads), as is the base of an adapter
    trained with `model.rope_scaling` (the base arms run with the base's own RoPE). QLoRA
    adapters run on the 4-bit base they trained on. On a GPU actor the models go to the GPU,
    in bf16 when the job trains in bf16."""
    from ft_ray.models import load_base_model, load_quantized_model, own_rope

    dtype, placed = arm_dtype(job), lambda model: arm_placed(job, model)

    def base_model(model: ModelConfig) -> Any:
        return (load_quantized_model(model, job.quantization, False) if job.method == "qlora"
                else placed(load_base_model(model, dtype)))

    unstretched = own_rope(job.model)
    if (variant / "adapter_config.json").exists():
        from peft import PeftModel

        base = base_model(job.model)
        adapted = PeftModel.from_pretrained(base, str(variant)).eval()
        if start:
            load_start_adapter(adapted, job)
        if job.model.rope_scaling == "none":
            return base, adapted, True
        return base_model(unstretched) if base_arms else None, adapted, False
    from transformers import AutoModelForCausalLM

    if not (variant / "config.json").exists():
        raise FileNotFoundError(f"{variant}: neither an adapter (adapter_config.json) nor a model folder (config.json)")
    full = AutoModelForCausalLM.from_pretrained(str(variant), dtype=dtype,
                                                attn_implementation=job.model.attn_implementation)
    return placed(load_base_model(unstretched, dtype)) if base_arms else None, placed(full), False


class ArmScorer:
    """Scores batches of raw held-out records on the arms (a Ray Data actor's state)."""

    def __init__(self, job_json: str, variant: str, shots: list[str], fmt: str, fields: dict[str, str],
                 generate_keys: list[str], pool: dict[str, list[str]] | None = None,
                 arms: tuple[str, ...] = ARM_NAMES):
        """`shots`: the few-shot arm's examples; `pool`: the retrieval arm's, {"prompts": [...],
        "shots": [...]} (searched by prompt, placed as shot texts); `arms`: the names of those
        scored (the columns of the others are empty)."""
        import torch

        from ft_ray.models import load_tokenizer, stop_ids

        self.job = JobConfig.model_validate_json(job_json)
        self.settings = self.job.eval
        self.reward = None  # a grpo run's rewards: its generations are scored with them too
        if self.job.objective == "grpo":
            self.reward = metrics.reward_function(self.job.grpo.rewards, self.job.grpo.format_regex, self.job.storage)
        self.fmt, self.fields = fmt, fields
        self.all_arms = arms_of(self.job)  # those an evaluation of the job has columns for
        self.arms = tuple(arm for arm in self.all_arms if arm.name in arms)
        self.generate_keys = set(generate_keys)
        self.tokenizer = load_tokenizer(self.job.model)
        self.bos, self.stops = bos_id(self.tokenizer), stop_ids(self.tokenizer)
        self.reasoning_end = reasoning_end(self.tokenizer)
        torch.manual_seed(self.settings.seed)
        with local_folder(variant, self.job.storage, "ft-ray-variant-") as weights:
            self.base, self.variant, self.shared = load_arms(self.job, weights,
                                                             base_arms=any(arm.model == "base" for arm in self.arms),
                                                             start=any(arm.model == "start" for arm in self.arms))
        self.teacher = load_teacher_arm(self.job) if any(arm.model == "teacher" for arm in self.arms) else None
        self.teacher_reader = None  # a teacher of another tokenizer (distill.divergence uld) reads its own tokens
        if self.teacher is not None and self.job.distill.divergence == "uld":
            from ft_ray.train.distillation import CrossTokenizerTeacher

            theirs = load_tokenizer(self.job.teacher)
            self.teacher_reader = CrossTokenizerTeacher(None, self.tokenizer, theirs)
            self.teacher_speaks = theirs, bos_id(theirs), stop_ids(theirs)
        self.device = next(self.variant.parameters()).device
        # a SentencePiece word mark ("▁") opens the prompt's first example only
        self.marked = (getattr(self.tokenizer, "backend_tokenizer", None) is not None
                       and without_word_mark(self.tokenizer) is not None)
        self.fixed_shots = self.shot_forms(shots)
        pool = pool or {"prompts": [], "shots": []}
        self.retriever, self.pool_shots, self.pool_forms = Retriever(pool["prompts"]), pool["shots"], {}
        # without the base model (variant only, a full fine-tune): the variant has its config
        self.context = prompt_context(self.job, self.base if self.base is not None else self.variant)
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    @contextlib.contextmanager
    def model(self, arm: Arm) -> Iterator[Any]:
        if arm.model == "variant":
            yield self.variant
        elif arm.model == "start":
            with start_adapter_on(self.variant):
                yield self.variant
        elif arm.model == "teacher":
            yield self.teacher
        elif self.shared:
            with self.variant.disable_adapter():
                yield self.variant
        else:
            yield self.base

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {}
        examples = [self.prepare(str(text), str(error)) for text, error in zip(batch["text"], batch["error"])]
        good = [e for e in examples if "reason" not in e]
        pairs = [e for e in good if "rejected" in e]
        for arm in self.arms:
            sums = self.loss_sums(arm, [e[arm.name] for e in good]) if good else []
            for example, (loss_sum, tokens) in zip(good, sums):
                example[f"{arm.name}_loss_sum"], example[f"{arm.name}_tokens"] = loss_sum, tokens
            sums = self.loss_sums(arm, [e["rejected"][arm.name] for e in pairs]) if pairs else []
            for example, (loss_sum, tokens) in zip(pairs, sums):
                example[f"{arm.name}_rejected_loss_sum"], example[f"{arm.name}_rejected_tokens"] = loss_sum, tokens
        generated = []
        for example, path, line in zip(examples, batch["path"], batch["line"]):
            example["key"] = record_key(str(path), int(line))
            if "reason" not in example and example["key"] in self.generate_keys and example["prompt"]:
                self.generate_all(example)
                generated.append(example)
        self.score_rewards(generated)
        for example in examples:
            for column, value in self.row(example).items():
                rows.setdefault(column, []).append(value)
        return rows

    def score_rewards(self, examples: list[dict]) -> None:
        """Each arm's answer's reward (a grpo run's rewards; nan without), every answer of the
        batch in one call: a reward model scores them in its own batches."""
        answered = [(example, arm.name) for example in examples for arm in self.arms]
        if self.reward is None or not answered:
            scores = [float("nan")] * len(answered)
        else:
            scores = self.reward([e[f"{name}_answer"] for e, name in answered], [e["reference"] for e, _ in answered],
                                 [e["prompt"] for e, _ in answered])
        for (example, name), value in zip(answered, scores):
            example[f"{name}_reward"] = value

    def prepare(self, text: str, error: str) -> dict[str, Any]:
        """Ids and labels of one record for each arm, or the reason it cannot be scored (a
        preference pair: of its chosen answer, and under `rejected` of its rejected one, with
        the same examples before it)."""
        try:
            units = record_to_units(text, error, self.fmt, self.fields, self.tokenizer)
            segments = units[0][0]
            seg_ids, after_shots = self.segment_forms(segments)
            trainable = [t for _, t in segments]
            first = trainable.index(True)
            prompt = "".join(t for t, _ in segments[:first])
            plain = assemble(seg_ids, trainable, self.bos, self.job.model.max_seq_len)
            prefixes = self.prefixes(prompt, len(plain["input_ids"]), sum(map(len, seg_ids)) + 1,
                                     sum(map(len, after_shots)) + 1)
            example = self.arm_inputs(seg_ids, after_shots, trainable, prefixes, plain)
            if self.teacher_reader is not None:
                example.update(self.teacher_inputs(plain))
            if len(units) == 2:
                rejected = units[1][0]
                example["rejected"] = self.arm_inputs(*self.segment_forms(rejected), [t for _, t in rejected], prefixes)
        except RecordError as e:
            return {"reason": e.kind}
        return {**example, "prompt": prompt, "prefixes": prefixes,
                "prompt_ids": [i for ids in seg_ids[:first] for i in ids],
                "prompt_ids_after_shots": [i for ids in after_shots[:first] for i in ids],
                "reference": answer_text(self.tokenizer, segments[first][0])}

    def teacher_inputs(self, plain: dict[str, list[int]]) -> dict[str, Any]:
        """The teacher arm's ids and labels of an example in its own tokens (`teacher_example`:
        the same text), its target tokens counted as the model's (so its loss per token is its
        loss of the answer's text over the model's tokens of it, as the other arms' are), and
        its prompt's ids."""
        trained = [label != IGNORE_INDEX for label in plain["labels"]]
        ids, matches = self.teacher_reader.teacher_example(plain["input_ids"], trained)
        labels = [IGNORE_INDEX] * len(ids)
        for piece in matches:
            for at in piece.theirs:
                labels[at] = ids[at]
        first = min((piece.theirs[0] for piece in matches if piece.theirs), default=len(ids))
        bos = self.teacher_speaks[1]
        prompt = ids[1:first] if bos is not None and ids[:1] == [bos] else ids[:first]
        return {"teacher": {"input_ids": ids, "labels": labels, "model_tokens": sum(trained[1:])},
                "teacher_prompt_ids": prompt}

    def shot_forms(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Each shot text's ids (as a prompt's first example, as a later one: the same but
        for a tokenizer with a word mark, which only the first one opens with)."""
        opening = encode_batch(self.tokenizer, texts)
        later = encode_batch(self.tokenizer, texts, [True] * len(texts)) if self.marked else opening
        return list(zip(opening, later))

    def segment_forms(self, segments: list[tuple[str, bool]]) -> tuple[list[list[int]], list[list[int]]]:
        """An example's segment ids alone (the text's start) and after examples (all continued)."""
        alone = encode_segments(self.tokenizer, segments)
        if not self.marked:
            return alone, alone
        return alone, [*encode_batch(self.tokenizer, [segments[0][0]], [True]), *alone[1:]]

    def prefixes(self, prompt: str, plain_length: int, full_length: int,
                 after_shots_length: int) -> dict[str, list[list[int]]]:
        """Per scored prompting arm, the examples (token ids) that go before this record's prompt."""
        out = {}
        for arm in PROMPTING:
            if arm not in self.arms:
                continue
            if arm.shots == "fixed":
                forms = self.fixed_shots
            else:
                [nearest] = self.retriever.nearest([prompt], self.settings.few_shot)
                forms = [self.pool_shot_forms(i) for i in nearest]
            candidates = [opening if n == 0 else later for n, (opening, later) in enumerate(forms)]
            out[arm.name] = candidates[:self.shots_that_fit(candidates, plain_length, full_length, after_shots_length)]
        return out

    def pool_shot_forms(self, index: int) -> tuple[list[int], list[int]]:
        if index not in self.pool_forms:
            [self.pool_forms[index]] = self.shot_forms([self.pool_shots[index]])
        return self.pool_forms[index]

    def arm_inputs(self, seg_ids: list[list[int]], after_shots: list[list[int]], trainable: list[bool],
                   prefixes: dict[str, list[list[int]]], plain: dict | None = None) -> dict[str, Any]:
        """Each arm's ids and labels of one sequence: plain (given, or assembled here), or
        after its examples (within the prompting context)."""
        plain = plain or assemble(seg_ids, trainable, self.bos, self.job.model.max_seq_len)
        inputs = {}
        for arm in self.all_arms:
            shots = prefixes.get(arm.name)
            inputs[arm.name] = (assemble([[i for ids in shots for i in ids], *after_shots], [False, *trainable],
                                         self.bos, self.context) if shots else plain)
        return inputs

    def shots_that_fit(self, candidates: list[list[int]], plain_length: int, full_length: int,
                       after_shots_length: int) -> int:
        """How many of the candidate examples fit before the example (`after_shots_length`
        tokens there) within the prompting context (0 when the example itself had to be
        truncated to model.max_seq_len: the arms' losses must be on the same tokens)."""
        room = self.context - after_shots_length
        if plain_length < full_length:
            return 0
        shots, used = 0, 0
        for ids in candidates:
            if used + len(ids) > room:
                break
            shots, used = shots + 1, used + len(ids)
        return shots

    def loss_sums(self, arm: Arm, examples: list[dict]) -> list[tuple[float, int]]:
        """(sum of target-token losses, target tokens) per example, in padded batches."""
        import torch

        out = []
        size = self.settings.batch_size
        pad = self.speaker(arm)[0].pad_token_id
        with self.model(arm) as model, torch.no_grad():
            for start in range(0, len(examples), size):
                chunk = examples[start:start + size]
                width = max(len(e["input_ids"]) for e in chunk)
                ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in chunk])
                labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
                mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               use_cache=False).logits.float()
                targets = labels[:, 1:].to(self.device)
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
                counted = (targets != IGNORE_INDEX).sum(dim=1).tolist()
                counts = [e.get("model_tokens", n) for e, n in zip(chunk, counted)]  # the teacher's: the model's
                out.extend(zip(losses.sum(dim=1).tolist(), counts))
        return out

    def in_own_tokens(self, arm: Arm) -> bool:
        """Whether the arm is a teacher of another tokenizer, reading and answering in its own."""
        return self.teacher_reader is not None and arm.model == "teacher"

    def speaker(self, arm: Arm) -> tuple[Any, int | None, list[int]]:
        """The tokenizer, bos id and stop ids an arm's model reads and writes with."""
        return self.teacher_speaks if self.in_own_tokens(arm) else (self.tokenizer, self.bos, self.stops)

    def generate_all(self, example: dict) -> None:
        """Greedy answers of every scored arm to the example's prompt, scored."""
        for arm in self.arms:
            shots = example["prefixes"].get(arm.name, [])
            ids = [i for shot in shots for i in shot] + self.prompt_ids(example, shots)
            if self.in_own_tokens(arm):
                ids = example["teacher_prompt_ids"]  # (the teacher arm has no shots)
            answer, new_tokens, seconds = self.generate(arm, ids)
            answer = metrics.cut_at_next_example(answer, example["prompt"])
            name = arm.name
            example[f"{name}_answer"] = answer
            example[f"{name}_gen_tokens"], example[f"{name}_gen_s"] = new_tokens, seconds
            # after a reasoning block: a base model that answers without Qwen3's empty one is not marked down
            final, reference = (metrics.final_answer(text, self.reasoning_end) for text in (answer, example["reference"]))
            example[f"{name}_exact"] = metrics.exact_match(final, reference)
            example[f"{name}_chrf"] = metrics.chrf(final, reference)
            regex = self.settings.format_regex
            example[f"{name}_format"] = metrics.in_format(answer, regex) if regex else float("nan")

    @staticmethod
    def prompt_ids(example: dict, shots: list) -> list[int]:
        return example["prompt_ids_after_shots" if shots else "prompt_ids"]

    def generate(self, arm: Arm, prompt_ids: list[int]) -> tuple[str, int, float]:
        """(answer, new tokens, seconds) of a greedy continuation."""
        import torch

        tokenizer, bos, stops = self.speaker(arm)
        ids = torch.tensor([([bos] if bos is not None else []) + prompt_ids], device=self.device)
        started = time.perf_counter()
        with self.model(arm) as model, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        seconds = time.perf_counter() - started
        new = out[0, ids.shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds

    def row(self, example: dict) -> dict[str, Any]:
        """The figures of one record (fixed columns, so every batch has the same schema)."""
        generated = "variant_answer" in example
        row: dict[str, Any] = {"key": example["key"], "reason": example.get("reason", ""),
                               "generated": generated, "actor": self.actor, "context": self.context,
                               "prompt": example["prompt"] if generated else "",
                               "reference": example["reference"] if generated else ""}
        nan = float("nan")
        for arm in self.all_arms:
            name, shots = arm.name, example.get("prefixes", {}).get(arm.name, [])
            row[f"{name}_loss_sum"] = example.get(f"{name}_loss_sum", nan)
            row[f"{name}_tokens"] = example.get(f"{name}_tokens", 0)
            row[f"{name}_rejected_loss_sum"] = example.get(f"{name}_rejected_loss_sum", nan)
            row[f"{name}_rejected_tokens"] = example.get(f"{name}_rejected_tokens", 0)
            row[f"{name}_shots"] = len(shots)
            # what a request sends: bos, the arm's examples, the prompt
            row[f"{name}_prompt_tokens"] = (1 + len(self.prompt_ids(example, shots)) + sum(map(len, shots))
                                            if "prompt_ids" in example else 0)
            for column, empty in (("answer", ""), ("gen_tokens", 0), ("gen_s", 0.0), ("exact", nan), ("chrf", nan),
                                  ("format", nan), ("reward", nan)):
                row[f"{name}_{column}"] = example.get(f"{name}_{column}", empty)
        return row


def prompt_context(job: JobConfig, model: Any) -> int:
    """Tokens a prompting arm's request may hold: `eval.max_prompt_tokens`, else the base
    model's context window (`max_position_embeddings`), at least the training length."""
    if job.eval.max_prompt_tokens:
        return job.eval.max_prompt_tokens
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(job.model.max_seq_len, int(window or 0))
