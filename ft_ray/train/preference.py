"""Preference objectives: DPO, ORPO and KTO on packed batches.

A packed row holds whole units (`ft_ray.data.formats`): a pair is its prompt + chosen answer
then its prompt + rejected answer, each a span of its own (positions restart at 0), with
every token's role in the batch's `roles` column. So the log-probability of each answer is
a sum over its span's target tokens, and the k-th chosen span of a batch (in row-major
order) pairs with the k-th rejected one. No pair is padded to the longest of its batch.

The reference log-probs are precomputed by default (`preference.reference: precomputed`):
one pass of model actors over the packed blocks before training adds each token's reference log-prob
to the packed rows (`REF_COLUMN`), so the training workers hold no reference model and run
no reference forward. Inline, the reference is the trained model with its adapter switched
off (LoRA, QLoRA: no second copy) or a frozen copy of the base model (full fine-tunes), run
without gradients on the same batch. ORPO needs none.

Formulas as TRL documents them (DPOTrainer's sigmoid loss, ORPOTrainer's odds-ratio loss);
KTO's reference point z0 is estimated from the batch's own answers (the mean of their
policy/reference log-ratios, detached, at least 0), where TRL pairs each prompt with
another answer of the batch and runs one more forward pass for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ft_ray.data.formats import CHOSEN, REJECTED
from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.train.fast_paths import chunked_lm_head, fuse_lora_layers, has_chunked_head, head_gives_logits
from ft_ray.train.precomputed import BlockScorer, with_columns

REF_COLUMN = "ref_logps"  # per token of a packed row: its log-prob under the reference model (0 where no target)
PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                "logps_rejected")


@dataclass
class Answers:
    """Per answer span of a batch, in row-major order: summed log-prob of its target tokens,
    how many there are, and its role."""

    logps: torch.Tensor
    tokens: torch.Tensor
    roles: torch.Tensor

    def of(self, role: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.roles == role
        return self.logps[keep], self.tokens[keep]


def logits_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def token_logps_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L]: each token of the batch's `input_ids` its log-prob under `model` (`token_logps`),
    from its head in chunks where it has one (`fast_paths.chunked_lm_head`: no [B, L, V] logits)."""
    if has_chunked_head(unwrapped(model)):
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     token_logps_of=batch["labels"])["token_logps"]
    return token_logps(logits_of(model, batch), batch["labels"])


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L]: each token's log-prob given the tokens before it (logits [B, L, V]), 0 where
    its label is not a target (prompt, padding, the first token of a row)."""
    targets = labels[:, 1:]
    logps = -F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return F.pad(logps * (targets != IGNORE_INDEX), (1, 0))


def answer_sums(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> Answers:
    """Per answer span (spans start where `position_ids` is 0), the sum of `values` ([B, L],
    one per token: log-probs from `token_logps`) over its target tokens."""
    labels, positions, roles = batch["labels"], batch["position_ids"], batch["roles"]
    rows, length = labels.shape
    span = torch.cumsum((positions == 0).long(), dim=1) - 1  # each token's span, counted within its row
    flat = (span + torch.arange(rows, device=span.device).unsqueeze(1) * length).reshape(-1)
    counted = (labels != IGNORE_INDEX)
    counted[:, 0] = False  # a row's first token is predicted from nothing
    logps = torch.zeros(rows * length, device=values.device, dtype=torch.float32)
    logps = logps.index_add(0, flat, (values.float() * counted).reshape(-1))
    tokens = torch.zeros(rows * length, device=values.device, dtype=torch.long)
    tokens = tokens.index_add(0, flat, counted.reshape(-1).long())
    span_roles = torch.zeros(rows * length, device=values.device, dtype=roles.dtype)
    starts = positions == 0
    span_roles[flat.view(rows, length)[starts]] = roles[starts]
    return Answers(logps, tokens, span_roles)


def count_role(batch: dict[str, torch.Tensor], role: int) -> int:
    """How many answer spans of `role` a batch holds."""
    return int(((batch["position_ids"] == 0) & (batch["roles"] == role)).sum())


class PreferenceObjective:
    """What DPO, ORPO and KTO share: the policy forward, the reference log-probs, the metrics."""

    name = "preference"
    columns = ("input_ids", "labels", "position_ids", "roles")
    metrics: tuple[str, ...] = PAIR_METRICS

    def __init__(self, beta: float, reference: Callable[[Any, dict], torch.Tensor] | None):
        """`reference(model, batch)`: each token's reference log-prob ([B, L], as `token_logps_of`)."""
        self.beta, self.reference = beta, reference

    def reference_answers(self, model: Any, batch: dict[str, torch.Tensor]) -> Answers:
        """The reference's answer log-probs: precomputed in the batch, or a forward without gradients."""
        if REF_COLUMN in batch:
            return answer_sums(batch[REF_COLUMN], batch)
        with torch.no_grad():
            return answer_sums(self.reference(model, batch), batch)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_role(batch, CHOSEN)  # pairs

    def pair_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                     rejected_logps: torch.Tensor) -> dict[str, float]:
        c, r = chosen_rewards.detach(), rejected_rewards.detach()
        return {"rewards_chosen": c.sum().item(), "rewards_rejected": r.sum().item(),
                "reward_accuracy": (c > r).float().sum().item(), "reward_margin": (c - r).sum().item(),
                "logps_chosen": chosen_logps.detach().sum().item(),
                "logps_rejected": rejected_logps.detach().sum().item()}


class DPOLoss(PreferenceObjective):
    """Direct Preference Optimization: -log sigmoid(beta * ((pc - rc) - (pr - rr))) per pair, with
    p/r the policy/reference log-probs of the chosen (c) and rejected (r) answers (`dpo_loss`:
    its IPO and hinge variants, label smoothing); with a `chosen_nll_weight`, plus that times
    the chosen answers' next-token loss (RPO)."""

    name = "dpo"

    def __init__(self, beta: float, reference: Callable, chosen_nll_weight: float = 0.0, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0):
        super().__init__(beta, reference)
        self.chosen_nll_weight, self.loss_type, self.label_smoothing = chosen_nll_weight, loss_type, label_smoothing
        if chosen_nll_weight:
            self.metrics = PAIR_METRICS + ("nll_loss",)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        policy = answer_sums(token_logps_of(model, batch), batch)
        reference = self.reference_answers(model, batch)
        (pc, nc), (pr, nr) = policy.of(CHOSEN), policy.of(REJECTED)
        (rc, _), (rr, _) = reference.of(CHOSEN), reference.of(REJECTED)
        if self.loss_type == "ipo":  # IPO's margin is of mean log-probs per token (as TRL computes it)
            per_chosen, per_rejected = nc.clamp(min=1), nr.clamp(min=1)
            losses, chosen_rewards, rejected_rewards = dpo_loss(pc / per_chosen, pr / per_rejected, rc / per_chosen,
                                                                rr / per_rejected, self.beta, "ipo")
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type,
                                                                self.label_smoothing)
        metrics = self.pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
        if not self.chosen_nll_weight:
            return _mean(losses), metrics
        nll = chosen_nll(pc, nc)
        metrics["nll_loss"] = nll.item() * len(pc)
        return _mean(losses) + self.chosen_nll_weight * nll, metrics


def chosen_nll(chosen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss over all the chosen answers' target tokens."""
    return -chosen.sum() / tokens.sum().clamp(min=1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from log-probs, as TRL's DPOTrainer
    computes them: `sigmoid` -log sigmoid(beta x margin), with `label_smoothing` e (cDPO)
    (1 - e) of it plus e x -log sigmoid(-beta x margin); `ipo` (margin - 1/(2 beta))^2; `hinge`
    max(0, 1 - beta x margin)."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


class ORPOLoss(PreferenceObjective):
    """Odds Ratio Preference Optimization: the chosen answers' next-token loss minus
    beta * log sigmoid(log odds ratio of the chosen over the rejected answer), with the odds
    from length-normalised log-probs. No reference model."""

    name = "orpo"
    metrics = PAIR_METRICS + ("nll_loss", "log_odds_ratio")

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        policy = answer_sums(token_logps_of(model, batch), batch)
        (pc, nc), (pr, nr) = policy.of(CHOSEN), policy.of(REJECTED)
        chosen_mean, rejected_mean = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        nll = chosen_nll(pc, nc)
        ratio, log_odds = orpo_odds_ratio(chosen_mean, rejected_mean, self.beta)
        pairs = len(pc)
        metrics = self.pair_metrics(self.beta * chosen_mean, self.beta * rejected_mean, pc, pr)
        metrics.update(nll_loss=nll.item() * pairs, log_odds_ratio=log_odds.detach().sum().item())
        return nll - _mean(ratio), metrics


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * log sigmoid(log odds ratio), the log odds ratio) per pair, from mean log-probs per token."""
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean))
                                                - torch.log1p(-torch.exp(rejected_mean)))
    return beta * F.logsigmoid(log_odds), log_odds


class SimPOLoss(PreferenceObjective):
    """Simple Preference Optimization (Meng et al., 2024): -log sigmoid(beta * (mean log-prob
    per token of the chosen answer - of the rejected one) - gamma). No reference model; the
    length normalisation keeps long answers from winning by length."""

    name = "simpo"

    def __init__(self, beta: float, gamma: float):
        super().__init__(beta, None)
        self.gamma = gamma

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        policy = answer_sums(token_logps_of(model, batch), batch)
        (pc, nc), (pr, nr) = policy.of(CHOSEN), policy.of(REJECTED)
        chosen_mean, rejected_mean = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        metrics = self.pair_metrics(self.beta * chosen_mean, self.beta * rejected_mean, pc, pr)
        return _mean(simpo_loss(chosen_mean, rejected_mean, self.beta, self.gamma)), metrics


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """The loss per pair from mean log-probs per answer token."""
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)


class KTOLoss(PreferenceObjective):
    """Kahneman-Tversky Optimization on answers labelled good (CHOSEN) or bad (REJECTED):
    1 - sigmoid(beta * (r - z0)) for good answers, 1 - sigmoid(beta * (z0 - r)) for bad ones,
    r the policy/reference log-ratio of the answer, z0 the batch's reference point."""

    name = "kto"
    metrics = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "kl")

    def __init__(self, beta: float, reference: Callable, desirable_weight: float, undesirable_weight: float):
        super().__init__(beta, reference)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_role(batch, CHOSEN) + count_role(batch, REJECTED)  # judged answers

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        policy = answer_sums(token_logps_of(model, batch), batch)
        reference = self.reference_answers(model, batch)
        judged = policy.roles > 0
        ratios = (policy.logps - reference.logps)[judged]
        good = policy.roles[judged] == CHOSEN
        losses, z0 = kto_loss(ratios, good, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = self.beta * ratios.detach()
        return _mean(losses), {
            "rewards_chosen": rewards[good].sum().item(), "rewards_rejected": rewards[~good].sum().item(),
            "reward_accuracy": ((rewards > 0) == good).float().sum().item(), "kl": z0.item() * len(ratios)}


def kto_loss(ratios: torch.Tensor, good: torch.Tensor, beta: float, desirable_weight: float,
             undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss per answer, the reference point z0) from policy/reference log-ratios."""
    z0 = ratios.detach().mean().clamp(min=0) if len(ratios) else ratios.new_zeros(())
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratios))))
    return losses, z0


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.sum()


def adapter_off_reference(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference log-probs of a LoRA/QLoRA run: the same model with its adapter switched off."""
    with unwrapped(model).disable_adapter():
        return token_logps_of(unwrapped(model), batch)


def inline_reference(config: Any, model: Any) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """The reference log-probs a worker computes itself (DPO/KTO `preference.reference: inline`,
    GRPO's KL): the trained model with its adapter off, or a frozen copy (`reference_model`) for
    a full fine-tune or an adapter that started trained (`model.adapter`: off, it is not the start)."""
    if config.trains_adapter and not config.model.adapter:
        return adapter_off_reference
    from ft_ray.train.engine_api import worker_device

    return frozen_copy_reference(config, worker_device(config.distributed.use_gpu))


def reference_model(config: Any, device: torch.device, chunked_head: bool = True, sharded: bool = False) -> Any:
    """A frozen copy of the model as the run starts training it (4-bit for QLoRA, the frozen
    base's dtype for LoRA, with the adapter of `model.adapter`, per-example attention; its
    log-probs from the head in chunks unless `train.fused_kernels: none` or not `chunked_head`), on `device`.
    `sharded` (fsdp): left on the CPU for `shard_model`, and built empty on the workers that
    take its weights from rank 0 (`fsdp_engine.builds_empty`). Under ZeRO-3 built partitioned
    where the job does so (`JobConfig.partitions_at_load`)."""
    from ft_ray.models import continue_adapter, load_base_model, load_quantized_model, mend_untrained_tokens
    from ft_ray.train.deepspeed_engine import partitioned_at_load, peft_reads_partitioned
    from ft_ray.train.engine_api import COMPUTE_DTYPES
    from ft_ray.train.fsdp_engine import builds_empty, rank0_answer, weights_from_rank0
    from ft_ray.train.modeling import forward_as_trained

    if config.method == "qlora":
        model = load_quantized_model(config.model, config.quantization, False)
    else:
        dtype = COMPUTE_DTYPES.get(config.train.precision) if config.trains_adapter else None
        with partitioned_at_load(config):  # ZeRO-3's inline reference: built partitioned
            model = load_base_model(config.model, dtype=dtype, empty=sharded and builds_empty(config))
        model = model if sharded else model.to(device)
    chunked = chunked_head and config.train.fused_kernels != "none"
    if sharded and weights_from_rank0(config):  # what rank 0 finds in the weights and by a forward, on all
        plain_logits = rank0_answer(lambda: (mend_untrained_tokens(model, config.model),
                                             chunked and head_gives_logits(model))[1])
    else:
        mend_untrained_tokens(model, config.model)  # the policy's start: the reference
        plain_logits = None  # found out by chunked_lm_head
    # the trained model's forward as it starts, to the last bit (and a continued adapter's fused LoRA layers
    # below: PEFT's bf16 forward differs by up to 0.1 in a token's log-prob)
    forward_as_trained(model, config, (lambda _: chunked_lm_head(model, sft_loss=False, plain_logits=plain_logits))
                       if chunked else None)
    if config.model.adapter:
        with peft_reads_partitioned(model, config, token_rows=True):  # a DoRA adapter's norms, its token rows
            model = continue_adapter(model, config, config.model.name_or_path, trainable=False)
        if config.fuses_lora:
            fuse_lora_layers(model)
    return model.eval().requires_grad_(False)


def frozen_copy_reference(config: Any, device: torch.device) -> Callable:
    """The reference log-probs of a full fine-tune with `preference.reference: inline`: a frozen
    copy of the base on the worker's `device`, sharded across the workers like the trained
    model under ZeRO-3 and FSDP (there in the compute dtype, as ZeRO-3 keeps it; QLoRA's as
    loaded). The copy is the function's `model`."""
    fsdp = config.distributed.strategy == "fsdp"
    copy = reference_model(config, device, chunked_head=not config.zero3, sharded=fsdp)  # ZeRO-3 gathers the head's weight in its forward only
    if config.zero3:
        copy = sharded_for_inference(copy, config)
    elif fsdp:
        from ft_ray.train.engine_api import COMPUTE_DTYPES
        from ft_ray.train.fsdp_engine import shard_model

        compute = COMPUTE_DTYPES.get(config.train.precision)
        if compute and config.method != "qlora":  # its weights, as fsdp gathers the trained model's; not its
            for weight in copy.parameters():      # buffers (RoPE's frequencies in bf16 moved every log-prob)
                weight.data = weight.data.to(compute)
        shard_model(copy, config, device, trains=False, from_rank0=config.loads_on_rank0)

    def forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_logps_of(copy, batch)

    forward.model = copy
    return forward


def sharded_for_inference(model: Any, config: Any, what: str = "reference: a frozen copy of the base model") -> Any:
    """`model` under a DeepSpeed ZeRO-3 engine without an optimizer: each worker keeps its shard
    of the weights, gathered layer by layer in the forward (what TRL does for its reference
    and its teacher); `what` it is, said once."""
    import deepspeed

    from ft_ray.train.deepspeed_engine import cast_added_weights, deepspeed_config
    from ft_ray.train.engine_api import COMPUTE_DTYPES

    settings = deepspeed_config(config, total_steps=1)
    settings.pop("optimizer", None)
    cast_added_weights(model, COMPUTE_DTYPES.get(config.train.precision))  # a continued adapter's, as the trained model's
    engine, *_ = deepspeed.initialize(model=model, config=settings, dist_init_required=False)
    engine.eval()
    held = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    total = sum(p.ds_numel for p in engine.module.parameters())
    if engine.global_rank == 0:
        from ft_ray.console import LOG

        LOG.info(f"{what} sharded by ZeRO-3, {held / 1e6:.3g}M of its {total / 1e6:.3g}M parameters on each worker")
    return engine


def unwrapped(model: Any) -> Any:
    """The model inside a DDP or DeepSpeed wrapper."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def build_preference_objective(config: Any, model: Any) -> PreferenceObjective:
    """The job's preference objective with its inline reference model (none for ORPO, or
    when the reference log-probs come precomputed with the data)."""
    preference = config.preference
    reference: Callable | None = None
    if config.objective in ("dpo", "kto") and not config.precomputes_reference:
        reference = inline_reference(config, model)
    if config.objective == "dpo":
        return DPOLoss(preference.beta, reference, preference.chosen_nll_weight, preference.loss_type,
                       preference.label_smoothing)
    if config.objective == "orpo":
        return ORPOLoss(preference.beta, None)
    if config.objective == "simpo":
        return SimPOLoss(preference.beta, preference.simpo_gamma)
    return KTOLoss(preference.beta, reference, preference.desirable_weight, preference.undesirable_weight)



# ---------------------------------------------------------------- the precomputed reference


class ReferenceScorer(BlockScorer):
    """A model actor (`with_reference`): the reference model, adding `REF_COLUMN` to packed rows."""

    def load(self) -> Any:
        return reference_model(self.job, self.device)

    def columns_of(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {REF_COLUMN: token_logps_of(self.model, batch).float().cpu().numpy()}

    def empty(self, width: int) -> dict[str, Any]:
        import numpy as np

        return {REF_COLUMN: np.zeros((0, width), dtype=np.float32)}


def with_reference(config: Any, datasets: dict[str, Any]) -> dict[str, Any]:
    """The packed datasets with each token's reference log-prob (`with_columns`)."""
    model = "the base model" + (f" with the adapter {config.model.adapter}" if config.model.adapter else "")
    return with_columns(config, datasets, ReferenceScorer, "reference", f"log-probs of {model} for every answer")
