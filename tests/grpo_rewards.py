"""Reward functions a GRPO job names as module:function (`grpo.rewards`), for the tests."""


def opens_like_the_reference(answer: str, reference: str, prompt: str) -> bool:
    """Whether the answer's first word is the record's answer's (the demo's: "Hi"). The prompt
    must be the customer message the answer replies to."""
    if "Reply to this customer message" not in prompt:
        raise ValueError(f"not the record's prompt: {prompt!r}")
    return answer.split(" ", 1)[0] == reference.split(" ", 1)[0]


def open_like_the_references(prompts, completions, reference, **kwargs):
    """`opens_like_the_reference` as TRL's reward functions are written: one call per batch,
    lists in, one number per completion out."""
    return [opens_like_the_reference(c, r, p) for p, c, r in zip(prompts, completions, reference)]


def shorter_than_ten_words(completions, **kwargs):
    """A TRL-style reward that scores only some completions: None (not scored) for empty ones."""
    return [len(c.split()) < 10 if c.strip() else None for c in completions]


def needs_a_solution(completions, solution, **kwargs):
    """A TRL reward reading a dataset column ft-ray does not give."""
    return [c == s for c, s in zip(completions, solution)]


def one_number(completions, **kwargs):
    return 1.0


def not_a_number(answer: str, reference: str, prompt: str) -> str:
    return "good"


BATCHES: list[int] = []  # the batch sizes `counted_words` was called with


def counted_words(completions, **kwargs):
    """Each completion's word count, remembering how many completions each call had."""
    BATCHES.append(len(completions))
    return [len(c.split()) for c in completions]
