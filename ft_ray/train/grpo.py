"""GRPO (Shao et al., 2024, DeepSeekMath): answers sampled from the model being trained,
scored by rewards, each answer's advantage its reward against the other answers to the same
prompt.

Each training row holds one record: its prompt (the tokens before its first label) and its
answer (the first run of labelled tokens: what the rewards compare with; `grpo.rewards` are
built in or the job's own `module:function`, per answer or per batch). For a micro batch, the model samples
`grpo.num_generations` answers per prompt (left-padded prompts, its own KV cache, no
gradients), the rewards score them, and the loss is the policy gradient of the answers' tokens
weighted by their group-normalised advantages, averaged over the sampled tokens (TRL's
`loss_type: dapo` normalisation), plus `grpo.beta` times a per-token KL estimate to the
reference model. One update per sampled batch (TRL's `num_iterations: 1`): the PPO ratio is 1
at the update, so its clip never acts and is left out.

Evaluation answers each held-out prompt greedily, once: `eval_loss` is minus the mean reward
(so the best checkpoint and early stopping follow the reward), `eval_reward` the reward.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.evaluation.metrics import reward_function
from ft_ray.train.preference import adapter_off_reference, frozen_copy_reference, token_logps_of, unwrapped

ADVANTAGE_EPSILON = 1e-4  # TRL's: a group whose answers all scored the same has advantage 0


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, over the group's standard deviation where `scale`
    (TRL's `scale_rewards: group`, else `none`); `rewards` holds `group` consecutive answers
    per prompt."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPSILON) if scale else centred).view(-1)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, beta: float,
              ref_logps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss, the mean per-token KL estimate) of sampled answers: logps and mask [N, L]
    (the answer tokens), advantages [N]. The policy-gradient term is -A exp(logp - logp.detach())
    per token (its value -A, its gradient -A grad logp); the KL estimate is Schulman's k3,
    exp(ref - logp) - (ref - logp) - 1."""
    per_token = -advantages[:, None] * torch.exp(logps - logps.detach())
    kl = torch.zeros_like(logps)
    if beta and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1)
    return (per_token * mask).sum() / tokens, ((kl * mask).sum() / tokens).detach()


class GRPOObjective:
    """Objective grpo (see the module's docstring)."""

    name = "grpo"
    columns = ("input_ids", "labels", "position_ids")
    metrics = ("reward", "reward_std", "answer_tokens", "kl")

    def __init__(self, config: Any, tokenizer: Any, reference: Callable[[Any, dict], torch.Tensor] | None):
        self.settings, self.tokenizer, self.reference = config.grpo, tokenizer, reference
        self.seed = config.train.seed
        self.reward = reward_function(config.grpo.rewards, config.grpo.format_regex)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # prompts

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        prompts, references = self.prompts_of(batch)
        training = unwrapped(model).training  # DeepSpeed's engine passes train/eval to its module only
        group = self.settings.num_generations if training else 1
        answers = self.sample(unwrapped(model), prompts, group, training, self.sampling_seed(batch))
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        asked = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        rewards = torch.tensor(self.reward(texts, [references[i // group] for i in range(len(texts))],
                                           [asked[i // group] for i in range(len(texts))]))
        lengths = torch.tensor([float(len(a)) for a in answers])
        per_prompt = rewards.view(-1, group)
        metrics = {"reward": per_prompt.mean(dim=1).sum().item(),
                   "reward_std": (per_prompt.std(dim=1).sum().item() if group > 1 else 0.0),
                   "answer_tokens": lengths.view(-1, group).mean(dim=1).sum().item(), "kl": 0.0}
        if not training:  # evaluation: the greedy answers' reward is the score
            return -per_prompt.mean(), metrics
        scored = self.answer_batch(prompts, answers, group, batch["input_ids"].device)
        logps = token_logps_of(model, scored)
        ref_logps = None
        if self.settings.beta:
            with torch.no_grad():
                ref_logps = self.reference(model, scored)
        mask = (scored["labels"] != IGNORE_INDEX).float()
        if self.settings.mask_truncated_answers:  # cut at max_new_tokens: no end of text
            ended = torch.tensor([bool(a) and a[-1] == self.tokenizer.eos_token_id for a in answers], device=mask.device)
            mask = mask * ended[:, None]
        advantages = group_advantages(rewards, group, self.settings.scale_rewards == "group").to(logps.device)
        loss, kl = grpo_loss(logps, advantages, mask, self.settings.beta, ref_logps)
        metrics["kl"] = kl.item() * len(prompts)
        return loss, metrics

    def prompts_of(self, batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[str]]:
        """Each row's prompt (the ids before its first label) and its record's answer to it (the
        first run of labelled ids, as text: a conversation's first assistant turn)."""
        prompts, references = [], []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
            prompts.append(ids[:first] or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id])
            references.append(self.tokenizer.decode(labels[first:end], skip_special_tokens=True))
        return prompts, references

    def sampling_seed(self, batch: dict[str, torch.Tensor]) -> int | None:
        """The seed of a batch's sampling, from train.seed and its rows' sequence ids: the same
        batch with the same weights is answered the same way, so a resumed run samples what the
        uninterrupted one did (None without sequence ids: the global random state)."""
        if "seq_id" not in batch:
            return None
        ids = [self.seed, *batch["seq_id"].tolist()]
        return int.from_bytes(hashlib.sha256(repr(ids).encode()).digest()[:8], "little") % 2 ** 63

    @torch.no_grad()
    def sample(self, model: Any, prompts: list[list[int]], group: int, sampled: bool,
               seed: int | None = None) -> list[list[int]]:
        """`group` answers per prompt (greedy where not `sampled`), each up to and with its eos;
        sampled from `seed` where given, leaving the global random state as it was."""
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.settings.max_new_tokens,
                                     do_sample=sampled, temperature=self.settings.temperature if sampled else None,
                                     top_p=None, top_k=None, num_return_sequences=group, pad_token_id=pad,
                                     use_cache=True, eos_token_id=self.tokenizer.eos_token_id)
        finally:
            model.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            end = row.index(self.tokenizer.eos_token_id) + 1 if self.tokenizer.eos_token_id in row else len(row)
            answers.append(row[:end])
        return answers

    def answer_batch(self, prompts: list[list[int]], answers: list[list[int]], group: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt + answer per row, right-padded (causal attention never looks at the padding
        after a row's tokens), labels on the answer's tokens only."""
        rows = [(prompts[i // group], answer) for i, answer in enumerate(answers)]
        width = max(len(p) + len(a) for p, a in rows)
        pad = self.tokenizer.pad_token_id
        ids = [p + a + [pad] * (width - len(p) - len(a)) for p, a in rows]
        labels = [[IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX] * (width - len(p) - len(a)) for p, a in rows]
        return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
                "position_ids": torch.arange(width, device=device).expand(len(rows), width)}


def build_grpo_objective(config: Any, model: Any) -> GRPOObjective:
    """The objective with the job's tokenizer and, with `grpo.beta`, its reference: the
    adapter switched off (lora/qlora) or a frozen copy of the base (full)."""
    from ft_ray.models import load_tokenizer

    reference = None
    if config.grpo.beta:
        reference = (adapter_off_reference if config.trains_adapter
                     else frozen_copy_reference(config, next(model.parameters()).device))
    return GRPOObjective(config, load_tokenizer(config.model), reference)
