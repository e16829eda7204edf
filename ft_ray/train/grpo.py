"""GRPO (Shao et al., 2024, DeepSeekMath): answers sampled from the model being trained,
scored by rewards, each answer's advantage its reward against the other answers to the same
prompt.

Each training row holds one record: its prompt (the tokens before its first label) and its
answer (the first run of labelled tokens: what the rewards compare with; `grpo.rewards` are
built in, the job's own `module:function` (per answer or per batch) or a reward model). For a
micro batch, the model samples `grpo.num_generations` answers per prompt (left-padded
prompts, its own KV cache, no gradients), the rewards score them, and the loss is the policy gradient of the answers' tokens
weighted by their group-normalised advantages, plus `grpo.beta` times a per-token KL estimate
to the reference model, averaged as `grpo.loss_type` says (TRL's names; `dapo` by default:
over every trained answer token of the step). A step's answers are sampled before its first
update (`step_weights`, as TRL samples a step's generation batch), so the loop knows what each
micro batch averages over and weighs them to that (`loop.step_scales`). With
`grpo.num_iterations` (mu) above 1 the loop hands each step's batches over mu steps in a row
(`loop.steps_of`): the first samples and scores them and keeps its answers, the next ones
update on those again, each token's probability ratio to the policy that sampled it clipped as
PPO's (`grpo.epsilon`, `epsilon_high`). At mu = 1 the ratio is 1 at the update and the clip
never acts.

Evaluation answers each held-out prompt greedily, once: `eval_loss` is minus the mean reward
(so the best checkpoint and early stopping follow the reward), `eval_reward` the reward.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.evaluation.metrics import reward_function
from ft_ray.models import stop_ids
from ft_ray.train import deepspeed_engine, fsdp_engine
from ft_ray.train.preference import inline_reference, token_logps_of, unwrapped

ADVANTAGE_EPSILON = 1e-4  # TRL's: a group whose answers all scored the same has advantage 0


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, over the group's standard deviation where `scale`
    (TRL's `scale_rewards: group`, else `none`); `rewards` holds `group` consecutive answers
    per prompt."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPSILON) if scale else centred).view(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              beta: float, ref_logps: torch.Tensor | None, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo",
              max_new_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss, the mean per-token KL estimate, the share of tokens clipped) of sampled
    answers: logps, old_logps (when sampled, detached) and mask [N, L] (the answer tokens),
    advantages [N]. The policy-gradient term is PPO's -min(r A, clip(r, 1 - epsilon,
    1 + epsilon_high) A) per token, r = exp(logp - old_logp) (at the sampling policy r = 1:
    value -A, gradient -A grad logp); the KL estimate is Schulman's k3,
    exp(ref - logp) - (ref - logp) - 1. The per-token terms are averaged as `loss_type`
    (`grpo.loss_type`) says within the batch: dapo and bnpo over its answer tokens, grpo over
    each answer's then over the answers, dr_grpo summed over N x `max_new_tokens`."""
    ratio = torch.exp(logps - old_logps)
    low, high = 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high)
    gains = advantages[:, None]
    per_token = -torch.min(ratio * gains, torch.clamp(ratio, low, high) * gains)
    clipped = ((ratio < low) & (gains < 0)) | ((ratio > high) & (gains > 0))  # no gradient there (TRL's clip_ratio)
    kl = torch.zeros_like(logps)
    if beta and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    else:
        loss = (per_token * mask).sum() / tokens
    return loss, ((kl * mask).sum() / tokens).detach(), (clipped * mask).sum() / tokens


def round_key(batch: dict[str, torch.Tensor]) -> bytes:
    """A training batch's key among the rounds sampled and not yet updated on."""
    return batch["input_ids"].cpu().numpy().tobytes() + batch["labels"].cpu().numpy().tobytes()


@dataclass
class Round:
    """A batch's sampled answers, kept for its `grpo.num_iterations` updates."""

    scored: dict[str, torch.Tensor]  # prompt + answer rows, labels on the answers
    advantages: torch.Tensor
    mask: torch.Tensor  # the answer tokens that train
    metrics: dict[str, float]
    old_logps: torch.Tensor | None = None  # at the first update (the sampling policy's)
    updates: int = 0


class Sampler:
    """Answers from the model being trained to the prompts of a batch's rows (one record per
    row: the prompt is the ids before its first label), up to `max_new_tokens` each, sampled at
    `temperature` from a seed of the batch's sequence ids and `seed` (GRPO's answers, on-policy
    distillation's)."""

    def __init__(self, tokenizer: Any, max_new_tokens: int, temperature: float, seed: int):
        self.tokenizer, self.max_new_tokens, self.temperature, self.seed = tokenizer, max_new_tokens, temperature, seed
        self.stops = stop_ids(tokenizer)  # an answer ends at the eos or the template's end of turn

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
        """`group` answers per prompt (greedy where not `sampled`), each up to and with its eos
        (or the template's end of turn, `stop_ids`), from `model` (or the model inside its
        engine) with its whole weights on each worker (`whole_weights`);
        sampled from `seed` where given, leaving the global random state as it was."""
        engine, model = model, unwrapped(model)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        was_training = model.training
        model.eval()
        try:
            with whole_weights(engine), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                     do_sample=sampled, temperature=self.temperature if sampled else None,
                                     top_p=None, top_k=None, num_return_sequences=group, pad_token_id=pad,
                                     use_cache=True, eos_token_id=self.stops,
                                     # ZeRO-3's start of a forward may be a collective even with the weights gathered
                                     # (its trace check after a re-trace): every worker runs as many forwards, one whose
                                     # answers ended empty ones, as transformers does under ZeRO-3
                                     synced_gpus=deepspeed_engine.shards_weights(engine))
        finally:
            model.train(was_training)
        answers = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.stops), len(row))
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


class GRPOObjective(Sampler):
    """Objective grpo (see the module's docstring)."""

    name = "grpo"
    columns = ("input_ids", "labels", "position_ids")
    metrics = ("reward", "reward_std", "answer_tokens", "kl", "clip_ratio")
    training_only = ("reward_std", "kl", "clip_ratio")  # one greedy answer per prompt, no update: not in eval lines

    def __init__(self, config: Any, tokenizer: Any, reference: Callable[[Any, dict], torch.Tensor] | None):
        super().__init__(tokenizer, config.grpo.max_new_tokens, config.grpo.temperature, config.train.seed)
        self.settings, self.reference = config.grpo, reference
        self.reward = reward_function(config.grpo.rewards, config.grpo.format_regex, config.storage)
        self.rounds: dict[bytes, Round] = {}  # batches sampled and not yet updated on num_iterations times

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])  # prompts

    def step_weights(self, model: Any, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """What each micro batch of a training step averages its loss over, by `grpo.loss_type`:
        dapo its trained answer tokens (the step's loss is then the mean over all of them, on
        every worker), grpo and dr_grpo its answers, bnpo 1 (the micro batches alike). Samples
        the batches' answers to know that (kept for `loss`), before the step updates anything."""
        weights = []
        for batch in micro_batches:
            key = round_key(batch)
            if key not in self.rounds:
                self.rounds[key] = self.sampled_round(model, batch)
            mask = self.rounds[key].mask
            if self.settings.loss_type == "dapo":
                weights.append(float(mask.sum()))
            elif self.settings.loss_type == "bnpo":
                weights.append(1.0)
            else:
                weights.append(float(mask.shape[0]))
        return weights

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if not unwrapped(model).training:  # evaluation (DeepSpeed's engine passes train/eval to its module only)
            _, rewards, metrics = self.answered(model, batch, group=1, sampled=False)
            return -rewards.mean(), metrics  # the greedy answers' reward is the score
        key = round_key(batch)
        round_ = self.rounds.pop(key, None) or self.sampled_round(model, batch)
        round_.updates += 1
        if round_.updates < self.settings.num_iterations:  # trained again at the next steps
            self.rounds[key] = round_
        logps = token_logps_of(model, round_.scored)
        if round_.old_logps is None:
            round_.old_logps = logps.detach()
        ref_logps = None
        if self.settings.beta:
            with torch.no_grad():
                ref_logps = self.reference(model, round_.scored)
        loss, kl, clipped = grpo_loss(logps, round_.old_logps, round_.advantages, round_.mask, self.settings.beta,
                                      ref_logps, self.settings.epsilon, self.settings.epsilon_high,
                                      self.settings.loss_type, self.settings.max_new_tokens)
        prompts = self.weight(batch)
        return loss, {**round_.metrics, "kl": kl.item() * prompts, "clip_ratio": clipped.item() * prompts}

    def answered(self, model: Any, batch: dict[str, torch.Tensor], group: int,
                 sampled: bool) -> tuple[list[list[int]], torch.Tensor, dict[str, float]]:
        """`group` answers to each row's prompt (sampled, or greedy), their rewards and the
        metric sums of the batch."""
        prompts, references = self.prompts_of(batch)
        answers = self.sample(model, prompts, group, sampled, self.sampling_seed(batch))
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        asked = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        rewards = torch.tensor(self.reward(texts, [references[i // group] for i in range(len(texts))],
                                           [asked[i // group] for i in range(len(texts))]))
        lengths = torch.tensor([float(len(a)) for a in answers])
        per_prompt = rewards.view(-1, group)
        metrics = {"reward": per_prompt.mean(dim=1).sum().item(),
                   "reward_std": (per_prompt.std(dim=1).sum().item() if group > 1 else 0.0),
                   "answer_tokens": lengths.view(-1, group).mean(dim=1).sum().item(), "kl": 0.0, "clip_ratio": 0.0}
        return answers, rewards, metrics

    def sampled_round(self, model: Any, batch: dict[str, torch.Tensor]) -> Round:
        """The batch's `num_generations` sampled answers per prompt, scored, as rows to train on."""
        group = self.settings.num_generations
        answers, rewards, metrics = self.answered(model, batch, group, sampled=True)
        scored = self.answer_batch(self.prompts_of(batch)[0], answers, group, batch["input_ids"].device)
        mask = (scored["labels"] != IGNORE_INDEX).float()
        if self.settings.mask_truncated_answers:  # cut at max_new_tokens: no end of text
            ended = torch.tensor([bool(a) and a[-1] in self.stops for a in answers], device=mask.device)
            mask = mask * ended[:, None]
        advantages = group_advantages(rewards, group, self.settings.scale_rewards == "group").to(mask.device)
        return Round(scored, advantages, mask, metrics)

def whole_weights(model: Any) -> Any:
    """A block with `model`'s whole weights on each worker, where a strategy shards them: ZeRO-3's
    engine (`deepspeed_engine.gathered`; each worker must still run as many forwards as the
    others) or FSDP's modules (`fsdp_engine.gathered`; each worker may run its own number of
    forwards). A collective."""
    if deepspeed_engine.shards_weights(model):
        return deepspeed_engine.gathered(model)
    return fsdp_engine.gathered(unwrapped(model))


def build_grpo_objective(config: Any, model: Any) -> GRPOObjective:
    """The objective with the job's tokenizer and, with `grpo.beta`, its reference
    (`preference.inline_reference`)."""
    from ft_ray.models import load_tokenizer

    reference = None
    if config.grpo.beta:
        reference = inline_reference(config, model)
    return GRPOObjective(config, load_tokenizer(config.model), reference)
