"""`ft-ray eval` of a reward model (objective reward_model): on the held-out preference pairs,
how often it scores the chosen answer above the rejected one, against the plainest rule a
reward model can learn instead of the preference: the longer answer wins. A paired bootstrap
over the pairs says whether the model beats that rule beyond noise; `eval.json` holds both
accuracies, the verdict and the pairs it ordered worst.

Each answer is scored as the run trained it: the record's prompt and answer tokenized and
assembled as training packs them (bos, the chat template for chat records, the eos), the
score read at the answer's last token.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from ft_ray.config import JobConfig
from ft_ray.data.formats import RecordError
from ft_ray.data.records import record_to_units
from ft_ray.data.tokenize import IGNORE_INDEX, tokenize_segments
from ft_ray.evaluation import metrics
from ft_ray.evaluation.reward_model import last_token_scores

WORST_KEPT = 5  # pairs shown in eval.json: those the model ordered most wrongly


def load_reward_model(job: JobConfig, weights: Path) -> Any:
    """The trained reward model: an adapter on its base as a sequence classifier with one
    score (4-bit for QLoRA), or a merged / full model folder; on the GPU in bf16 where the job
    trains so, in eval mode."""
    import torch

    from ft_ray.models import load_base_model, load_quantized_model, load_tokenizer

    gpu = job.distributed.use_gpu and torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu and job.train.precision == "bf16" else torch.float32
    if (weights / "adapter_config.json").exists():
        from peft import PeftModel

        if job.method == "qlora":
            base = load_quantized_model(job.model, job.quantization, False, scores=True)
        else:
            base = load_base_model(job.model, dtype, scores=True)
            base = base.to("cuda") if gpu else base
        model = PeftModel.from_pretrained(base, str(weights))
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            str(weights), dtype=dtype, num_labels=1, pad_token_id=load_tokenizer(job.model).pad_token_id)
        model = model.to("cuda") if gpu else model
    return model.eval()


class PairScorer:
    """Scores batches of raw held-out preference records (a Ray Data actor's state): each
    record's chosen and rejected answer's score and answer tokens, or why it was not scored."""

    def __init__(self, job_json: str, variant: str, fmt: str, fields: dict[str, str]):
        from ft_ray.models import load_tokenizer
        from ft_ray.storage import local_folder

        self.job = JobConfig.model_validate_json(job_json)
        self.fmt, self.fields = fmt, fields
        self.tokenizer = load_tokenizer(self.job.model)
        with local_folder(variant, self.job.storage, "ft-ray-variant-") as weights:
            self.model = load_reward_model(self.job, weights)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from ft_ray.evaluation.scoring import record_key

        pairs = [self.prepare(str(text), str(error)) for text, error in zip(batch["text"], batch["error"])]
        good = [p for p in pairs if "reason" not in p]
        scores = last_token_scores(self.model, [p["chosen"] for p in good] + [p["rejected"] for p in good],
                                   self.tokenizer.pad_token_id, self.job.eval.batch_size)
        for pair, chosen, rejected in zip(good, scores[:len(good)], scores[len(good):]):
            pair["chosen_score"], pair["rejected_score"] = chosen, rejected
        nan = float("nan")
        return {"key": [record_key(str(path), int(line)) for path, line in zip(batch["path"], batch["line"])],
                "reason": [p.get("reason", "") for p in pairs],
                "prompt": [p.get("prompt", "") for p in pairs],
                **{f"{side}_{column}": [p.get(f"{side}_{column}", empty) for p in pairs]
                   for side in ("chosen", "rejected")
                   for column, empty in (("score", nan), ("tokens", 0), ("text", ""))}}

    def prepare(self, text: str, error: str) -> dict[str, Any]:
        """Each answer's ids (prompt and answer, as training assembles them) and answer tokens,
        or the reason the record cannot be scored."""
        try:
            units = record_to_units(text, error, self.fmt, self.fields, self.tokenizer)
            if len(units) != 2:
                raise RecordError("not a preference pair (chosen and rejected)", "not_a_pair")
            pair: dict[str, Any] = {}
            for side, (segments, *_) in zip(("chosen", "rejected"), units):
                assembled = tokenize_segments(segments, self.tokenizer, self.job.model.max_seq_len)
                trainable = [t for _, t in segments]
                targets = [i for i, label in enumerate(assembled["labels"]) if label != IGNORE_INDEX]
                if not targets:
                    raise RecordError("the answer is cut off by model.max_seq_len", "no_answer_tokens")
                first = trainable.index(True)
                pair[side] = assembled["input_ids"][:targets[-1] + 1]  # scored at the answer's last token
                pair[f"{side}_tokens"] = len(targets)
                pair[f"{side}_text"] = "".join(t for t, trained in segments[first:] if trained)
                pair["prompt"] = "".join(t for t, _ in segments[:first])
        except RecordError as e:
            return {"reason": e.kind}
        return pair


def summarize_pairs(config: JobConfig, cols: dict[str, np.ndarray]) -> dict[str, Any]:
    """eval.json of a reward model: pair accuracy (a tie counts half) of the model and of the
    longer answer (by tokens), the model against that rule by the paired bootstrap, the mean
    score margin, what was not scored and why, and the pairs it ordered most wrongly."""
    settings = config.eval
    rows = np.flatnonzero(cols["reason"] == "")
    chosen, rejected = cols["chosen_score"][rows].astype(float), cols["rejected_score"][rows].astype(float)
    ordered = (chosen > rejected) + 0.5 * (chosen == rejected)
    lengths = cols["chosen_tokens"][rows].astype(float), cols["rejected_tokens"][rows].astype(float)
    longer = (lengths[0] > lengths[1]) + 0.5 * (lengths[0] == lengths[1])
    if len(rows):
        difference, low, high = metrics.paired_bootstrap(ordered, longer, None, settings.bootstrap_samples,
                                                         settings.seed)
    else:
        difference = low = high = float("nan")
    verdict = metrics.verdict("pair_accuracy", float(ordered.mean()) if len(rows) else float("nan"),
                              float(longer.mean()) if len(rows) else float("nan"), difference, low, high,
                              "the longer answer")
    figures = (f"pair accuracy {verdict['variant']:.3g} vs {verdict['other']:.3g}, 95% CI of the difference "
               f"[{low:.3g}, {high:.3g}]")
    verdict["sentence"] = {
        "variant_better": f"the reward model orders the held-out pairs better than the longer answer does: {figures}",
        "other_better": f"the longer answer orders the held-out pairs better than the reward model: {figures}: it "
                        "learned length more than the preference",
        "within_noise": f"the reward model is within noise of the longer answer: {figures}: it may have learned "
                        "length rather than the preference"}[verdict["outcome"]]
    worst = rows[np.argsort(chosen - rejected, kind="stable")[:WORST_KEPT]] if len(rows) else []
    return {"kind": "reward_model", "metric": "pair_accuracy", "examples": int(len(rows)),
            "not_scored": dict(collections.Counter(r for r in cols["reason"].tolist() if r)),
            "arms": {"variant": {"pair_accuracy": verdict["variant"],
                                 "mean_margin": float((chosen - rejected).mean()) if len(rows) else float("nan")},
                     "longer_answer": {"pair_accuracy": verdict["other"]}},
            "verdict": verdict,
            "worst_pairs": [{"key": str(cols["key"][i]), "prompt": str(cols["prompt"][i]),
                             "chosen": str(cols["chosen_text"][i]), "rejected": str(cols["rejected_text"][i]),
                             "chosen_score": float(cols["chosen_score"][i]),
                             "rejected_score": float(cols["rejected_score"][i])} for i in worst]}
