"""The arms `ft-ray eval` compares: which model answers, and what goes before the prompt.

An arm is a name (the prefix of its columns and its key in eval.json), the model it runs
(the base model, with a LoRA adapter switched off, the fine-tuned variant, for a run that
trained on from an adapter, `model.adapter`, that adapter: `start`, or for a distillation
run its teacher, `distill.teacher`) and the examples put
before each prompt: none, the first training examples (`fixed`), or the training examples
most similar to the prompt (`retrieved`, BM25 over their prompts). A new arm is one more
entry here (and, for a new kind of shots, one more branch in `scoring.ArmScorer.prefixes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # "base", "start", "teacher" or "variant"
    shots: str  # "none", "fixed" or "retrieved"

    @property
    def prompting(self) -> bool:
        """A prompting arm: the base model with examples before the prompt."""
        return self.shots != "none"

    def label(self, k: int) -> str:
        if self.model == "start":
            return "adapter start"
        if self.model == "teacher":
            return "teacher"
        return {"none": self.name, "fixed": f"base {k}-shot", "retrieved": f"base {k} retrieved"}[self.shots]

    def prompting_name(self, k: int, fitted: float) -> str:
        """How the verdict names a prompting arm, with the shots that fitted on average."""
        kind = {"fixed": "", "retrieved": "retrieval "}[self.shots]
        if fitted == k:
            return f"{kind}{k}-shot prompting"
        return f"{kind}few-shot prompting ({fitted:.2g} of {k} examples fitted on average)"


ARMS = (Arm("base", "base", "none"), Arm("few_shot", "base", "fixed"), Arm("retrieval", "base", "retrieved"),
        Arm("variant", "variant", "none"))
ARM_NAMES = tuple(arm.name for arm in ARMS)
PROMPTING = tuple(arm for arm in ARMS if arm.prompting)
START = Arm("start", "start", "none")
TEACHER = Arm("teacher", "teacher", "none")
ALL_ARMS = (*ARMS[:-1], START, TEACHER, ARMS[-1])  # in the order tables show them


def arms_of(job: Any) -> tuple[Arm, ...]:
    """The arms an evaluation of the job scores: `ARMS`, `START` where its LoRA run trained
    on from an adapter (`model.adapter`): did this run pay over where it started?, and
    `TEACHER` for a distillation run: how much of its teacher did the variant take in?"""
    extra = {START: bool(job.model.adapter and job.trains_adapter), TEACHER: job.objective == "distill"}
    return tuple(arm for arm in ALL_ARMS if extra.get(arm, True))


class Retriever:
    """BM25 (the `bm25s` package) over the prompts of a pool of training examples."""

    def __init__(self, prompts: list[str]):
        import bm25s

        self.size = len(prompts)
        self.index = bm25s.BM25()
        if prompts:
            self.index.index(bm25s.tokenize(prompts, stopwords="en", show_progress=False), show_progress=False)

    def nearest(self, queries: list[str], k: int) -> list[list[int]]:
        """The pool positions of the `k` prompts most similar to each query, best first."""
        import bm25s

        if not self.size or k <= 0 or not queries:
            return [[] for _ in queries]
        tokens: Any = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        found, _ = self.index.retrieve(tokens, k=min(k, self.size), show_progress=False)
        return [[int(i) for i in row] for row in found]
