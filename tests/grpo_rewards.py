"""Reward functions a GRPO job names as module:function (`grpo.rewards`), for the tests."""


def opens_like_the_reference(answer: str, reference: str, prompt: str) -> bool:
    """Whether the answer's first word is the record's answer's (the demo's: "Hi"). The prompt
    must be the customer message the answer replies to."""
    if "Reply to this customer message" not in prompt:
        raise ValueError(f"not the record's prompt: {prompt!r}")
    return answer.split(" ", 1)[0] == reference.split(" ", 1)[0]


def not_a_number(answer: str, reference: str, prompt: str) -> str:
    return "good"
