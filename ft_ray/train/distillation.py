"""Knowledge distillation (objective distill): at each token it trains on, the student learns
the teacher model's next-token distribution, beside (`distill.ratio`) the next-token loss on
the records' own tokens.

The teacher (`distill.teacher`: a causal LM with the student's tokenizer; another tokenizer
with divergence uld, `CrossTokenizerTeacher`) is loaded whole by every training worker (under
fsdp and ZeRO-3 sharded across them as the student is: `load_teacher`), frozen, in the
compute dtype (4-bit under QLoRA), and reads the same batch (its own tokens of the same text
for uld) without gradients (per-example attention, as the student). Where the student's head works in
chunks (`fast_paths.chunked_lm_head`), no [tokens, vocabulary] logits of either model exist:
the teacher's last hidden states at the target tokens are kept (a sharded teacher's own
forward gives its logits, those of the target tokens kept), and each chunk of rows takes both
heads' logits, its loss and its slope in turn (`_LinearRowLoss`).
Otherwise (ZeRO-3, `train.fused_kernels: none`, a head whose forward changes its output) the
student's own forward gives its logits and only the target tokens' rows are kept.

The divergence of each target token, between the teacher's p = softmax(teacher logits / T)
and the student's q = softmax(student logits / T), times T^2 (Hinton et al.): forward_kl
KL(p || q), reverse_kl KL(q || p), jsd beta KL(p || m) + (1 - beta) KL(q || m) with
m = beta p + (1 - beta) q (GKD's generalized JSD, as TRL's GKDTrainer computes it). Where the
two output layers differ in size (rows padded past the tokenizer), both distributions are
taken over the rows they share.

With `distill.on_policy`, that share of the training batches is answered by the student
itself (`grpo.Sampler`: the records' prompts, one per row) and the teacher grades every
token of its answers, the divergence alone (GKD's on-policy batches, its `lmbda`).

With `distill.teacher_logits: precomputed`, model actors run the teacher once over the packed
data before training (`with_teacher`, stored by `ft-ray prepare`) and keep its `top_k`
likeliest tokens and their logits at each target token; the workers hold no teacher
(`PrecomputedTeacher`: forward_kl over those tokens).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ft_ray.config import InputError, JobConfig
from ft_ray.data.tokenize import IGNORE_INDEX
from ft_ray.models import causal_lm
from ft_ray.train.fast_paths import LOGITS_CHUNK_BYTES, has_chunked_head, logits_are_the_heads
from ft_ray.train.grpo import Sampler, round_key
from ft_ray.train.precomputed import BlockScorer, with_columns
from ft_ray.train.preference import unwrapped

METRICS = ("divergence", "next_token_loss")


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per row: the divergence `kind` between the distributions of the teacher's and the
    student's fp32 logits ([rows, vocabulary], already divided by the temperature)."""
    q, p = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    if kind == "forward_kl":
        return (p.exp() * (p - q)).sum(-1)
    if kind == "reverse_kl":
        return (q.exp() * (q - p)).sum(-1)
    m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), dim=0)
    return beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)


class Teacher:
    """The frozen teacher: its logits at a batch's target tokens, chunk by chunk (`at`). A
    `sharded` one (FSDP, ZeRO-3) runs its own forward, which gathers its outer weights (the
    decoder alone would not, nor could its head's shard give logits)."""

    def __init__(self, model: Any, sharded: bool = False):
        self.model = model
        lm = causal_lm(unwrapped(model))
        head = lm.get_output_embeddings()
        self.decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
        plain = (type(head) is torch.nn.Linear and head.bias is None and isinstance(self.decoder, torch.nn.Module)
                 and logits_are_the_heads(lm, head) and not sharded)
        self.head = head if plain else None

    def divergence_of(self, batch: dict[str, torch.Tensor], keep: torch.Tensor, kind: str, beta: float,
                      temperature: float) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        """A function of (start, end, the student's fp32 logits of those target tokens over the
        temperature): each token's divergence `kind` from the teacher, over the output rows
        the two models share."""
        logits = self.at(batch, keep)

        def apart(start: int, end: int, student: torch.Tensor) -> torch.Tensor:
            taught = logits(start, end)
            shared = min(taught.shape[-1], student.shape[-1])
            return divergence(student[:, :shared], taught[:, :shared] / temperature, kind, beta)

        return apart

    def at(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """A function of (start, end): the teacher's fp32 logits of the target tokens start to
        end (`keep`: `labels[:, 1:] != IGNORE_INDEX`, its rows in row-major order). With a plain
        head only its last hidden states at those tokens are kept; the logits come a chunk at a time."""
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        with torch.no_grad():
            if self.head is None:
                logits = self.model(**inputs).logits[:, :-1][keep]
                return lambda start, end: logits[start:end].float()
            hidden = self.decoder(**inputs).last_hidden_state[:, :-1][keep]
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        weight, hidden = self.head.weight.to(dtype), hidden.to(dtype)
        return lambda start, end: (hidden[start:end] @ weight.t()).float()


class PrecomputedTeacher:
    """The teacher's top-k logits at each target token, carried by the batch (`TEACHER_IDS`,
    `TEACHER_LOGITS`: `with_teacher`). Its distribution p is taken over those k tokens; the
    divergence is forward_kl against the student's whole distribution q, sum of p (log p - log q)
    over the k tokens (the student's mass elsewhere lowers log q there, so it is still pulled
    onto the teacher's likeliest tokens). For uld (in the teacher's tokens, -inf where a target
    token has no match; `reader` the two tokenizers, `teacher_rows` the teacher's output rows):
    `uld` against q whole, p zero past its k (the student's mass past the k likeliest counts
    in full)."""

    def __init__(self, reader: CrossTokenizerTeacher | None = None, teacher_rows: int = 0):
        self.reader, self.teacher_rows = reader, teacher_rows

    def divergence_of(self, batch: dict[str, torch.Tensor], keep: torch.Tensor, kind: str, beta: float,
                      temperature: float) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        values, ids = batch[TEACHER_LOGITS][:, :-1][keep], batch[TEACHER_IDS][:, :-1][keep]
        if kind == "uld":
            def uld_apart(start: int, end: int, student: torch.Tensor) -> torch.Tensor:
                taught = values[start:end].float() / temperature
                rows = torch.nonzero(taught[:, 0].isfinite()).squeeze(-1)
                shared = self.reader.shared_for(student.shape[-1], self.teacher_rows) if self.reader else None
                return uld_at(student, rows, taught[rows], shared, ids[start:end][rows])

            return uld_apart

        def apart(start: int, end: int, student: torch.Tensor) -> torch.Tensor:
            p = F.log_softmax(values[start:end].float() / temperature, dim=-1)
            q = F.log_softmax(student, dim=-1).gather(-1, ids[start:end])
            return (p.exp() * (p - q)).sum(-1)

        return apart


class SharedTokens(NamedTuple):
    """The tokens of the same text in the model's vocabulary and the teacher's (`shared_tokens`)."""

    ours: torch.Tensor  # [the model's output rows] bool: the model's tokens with a teacher token of their text
    partner: torch.Tensor  # [the teacher's output rows] long: the model's token of each teacher token's text, -1: none


def shared_tokens(tokenizer: Any, teacher_tokenizer: Any, rows: int, teacher_rows: int,
                  specials: dict[int, int | None]) -> SharedTokens:
    """Which of the model's `rows` output rows and the teacher's `teacher_rows` are tokens of
    the same text (the same string in both vocabularies); the model's bos and eos are the
    teacher's (`specials`, as `CrossTokenizerTeacher` reads them), whatever their strings."""
    ours = tokenizer.get_vocab()
    pairs = {theirs: ours[token] for token, theirs in teacher_tokenizer.get_vocab().items()
             if token in ours and ours[token] < rows and theirs < teacher_rows}
    forced = {ours_id: theirs for ours_id, theirs in specials.items() if theirs is not None and ours_id < rows
              and theirs < teacher_rows}
    pairs = {theirs: ours_id for theirs, ours_id in pairs.items()
             if ours_id not in forced and theirs not in forced.values()}
    pairs.update({theirs: ours_id for ours_id, theirs in forced.items()})
    partner = torch.full((teacher_rows,), -1, dtype=torch.long)
    partner[list(pairs)] = torch.tensor(list(pairs.values()), dtype=torch.long)
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[list(pairs.values())] = True
    return SharedTokens(mask, partner)


def uld(student: torch.Tensor, teacher: torch.Tensor, shared: SharedTokens | None = None,
        ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: the universal logit distillation distance (Boizard et al., 2024) between the
    distributions of the student's and the teacher's fp32 logits (already over the temperature),
    over vocabularies of any two tokenizers: the L1 distance of their probabilities sorted from
    the likeliest down, the shorter padded with zeros (the 1-Wasserstein distance of the two
    distributions when the cost of moving mass between any two tokens is the same).

    With `shared` (GOLD's hybrid), the tokens of the same text in both vocabularies are
    compared token by token, by the generalized KL of the two models' probabilities of them,
    sum of p log(p / q) - p + q (0 only where they agree; with every token shared, forward_kl),
    and only the others sorted: where the vocabularies overlap it says which token the teacher
    prefers, not only how sure it is. `teacher` holds logits of the teacher's tokens `ids`
    ([rows, k]: its top k, p zero past them), or of its whole vocabulary in order (`ids` None)."""
    q, p = F.softmax(student, dim=-1), F.softmax(teacher, dim=-1)
    if shared is None:
        return sorted_l1(q, p)
    partner = shared.partner.to(p.device)
    partner = partner[ids] if ids is not None else partner[:p.shape[-1]].expand_as(p)
    paired = partner >= 0
    mine = shared.ours.to(q.device)[:q.shape[-1]]
    log_q = F.log_softmax(student, dim=-1).gather(-1, partner.clamp(min=0))  # of each teacher token's text
    apart = torch.where(paired, torch.xlogy(p, p) - p * log_q - p, 0.0).sum(-1) + q[:, mine].sum(-1)
    return apart + sorted_l1(q.masked_fill(mine, 0.0), p.masked_fill(paired, 0.0))


def sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row: the L1 distance of two rows of probabilities sorted from the largest down, the
    shorter padded with zeros."""
    q, p = q.sort(dim=-1, descending=True).values, p.sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    return (F.pad(q, (0, width - q.shape[-1])) - F.pad(p, (0, width - p.shape[-1]))).abs().sum(-1)


def uld_at(student: torch.Tensor, rows: torch.Tensor, teacher: torch.Tensor, shared: SharedTokens | None = None,
           ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of `student`: `uld` against the teacher's logits of `rows` (in order), 0 at the
    rows without the teacher's (target tokens it has no match for)."""
    if not len(rows):
        return student.new_zeros(len(student))
    return student.new_zeros(len(student)).index_put((rows,), uld(student[rows], teacher, shared, ids))


class TrainedPiece(NamedTuple):
    """A trained piece of an example read by a teacher of another tokenizer (`teacher_example`)."""

    ours: list[int]  # the positions of the model's tokens in the example
    theirs: list[int]  # of the teacher's, in its own tokens of the example
    aligned: list[tuple[int, int]]  # (ours, theirs) positions of tokens read after the same text


class CrossTokenizerTeacher:
    """A teacher with its own tokenizer (divergence uld). Each example of a batch (a packed row
    holds several, told apart by positions restarting at 0) is read back to text piece by
    piece, a piece being a run of prompt or of trained tokens between special tokens, and each
    piece is tokenized with the teacher's tokenizer; the model's bos, eos and pad tokens become
    the teacher's. The teacher reads those rows (its examples apart, as the model's).

    A trained token of the model is matched with the teacher's token that starts at the same
    place of the text (`text_starts`), so the two predict the next token after the same text
    (GOLD's alignment: where the two tokenizations split the text alike); a special token with
    the teacher's first token of its piece. The divergence at a matched token is `uld` of the
    two models' distributions (with `distill.uld_shared_tokens`, the tokens of the same text
    compared with each other); a trained token without a match (one that starts inside a
    teacher token, as "ing" of the model's "go" "ing" inside the teacher's "going") adds none
    (its next-token loss still counts)."""

    def __init__(self, teacher: Teacher | None, tokenizer: Any, teacher_tokenizer: Any, shares_tokens: bool = False):
        self.teacher, self.tokenizer, self.theirs = teacher, tokenizer, teacher_tokenizer
        specials = {tokenizer.pad_token_id: None,  # first: a pad that is also the bos or eos maps as that
                    tokenizer.bos_token_id: teacher_tokenizer.bos_token_id,
                    tokenizer.eos_token_id: teacher_tokenizer.eos_token_id}
        self.special = {ours: theirs for ours, theirs in specials.items() if ours is not None}  # None: dropped
        self.specials = set(self.special) | set(tokenizer.all_special_ids)
        self.pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else (
            teacher_tokenizer.eos_token_id or 0)
        self.shares_tokens = shares_tokens
        self.shared: SharedTokens | None = None  # made for the two models' output rows at the first batch

    def shared_for(self, rows: int, teacher_rows: int) -> SharedTokens | None:
        """The tokens of the same text (`shared_tokens`) for output layers of these sizes, with
        `distill.uld_shared_tokens`; None without."""
        if not self.shares_tokens:
            return None
        if self.shared is None or (len(self.shared.ours), len(self.shared.partner)) != (rows, teacher_rows):
            self.shared = shared_tokens(self.tokenizer, self.theirs, rows, teacher_rows, self.special)
        return self.shared

    def divergence_of(self, batch: dict[str, torch.Tensor], keep: torch.Tensor, kind: str, beta: float,
                      temperature: float) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        read, teacher_keep, partner = self.teacher_batch(batch, keep)
        logits = self.teacher.at(read, teacher_keep)
        partner = partner.to(keep.device)

        def apart(start: int, end: int, student: torch.Tensor) -> torch.Tensor:
            matched = partner[start:end]
            rows = torch.nonzero(matched >= 0).squeeze(-1)
            if not len(rows):
                return student.new_zeros(end - start)
            first, last = int(matched[rows[0]]), int(matched[rows[-1]]) + 1  # matches are in the model's order
            taught = logits(first, last)
            return uld_at(student, rows, taught / temperature, self.shared_for(student.shape[-1], taught.shape[-1]))

        return apart

    def pieces(self, ids: list[int], trained: list[bool]) -> list[tuple[list[int], bool, bool]]:
        """An example's tokens as (token ids, trained, special) runs: a special token alone."""
        runs: list[tuple[list[int], bool, bool]] = []
        for token, train in zip(ids, trained):
            special = token in self.specials
            if runs and not special and not runs[-1][2] and runs[-1][1] == train:
                runs[-1][0].append(token)
            else:
                runs.append(([token], train, special))
        return runs

    def teacher_example(self, ids: list[int], trained: list[bool]) -> tuple[list[int], list[TrainedPiece]]:
        """The teacher's tokens of one example, and its trained pieces (`TrainedPiece`: the
        positions of the model's tokens and of the teacher's in the example, and which match)."""
        from ft_ray.data.tokenize import encode_segments

        pieces = self.pieces(ids, trained)
        texts, before, plain = [], "", []
        for run, train, special in pieces:  # each piece's text: the text of the example's ordinary tokens up to its
            if not special:                 # end less that before it (a SentencePiece word mark opens the first only)
                plain += run
                upto = self.tokenizer.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                texts.append((upto[len(before):], train))
                before = upto
        encoded = encode_segments(self.theirs, texts) if texts else []
        our_starts = iter(text_starts(self.tokenizer, plain))
        their_starts = iter(text_starts(self.theirs, [token for piece in encoded for token in piece]))
        encoded_pieces = iter(encoded)
        out: list[int] = []
        matches: list[TrainedPiece] = []
        at = 0
        for run, train, special in pieces:
            if special and run[0] in self.special:
                theirs = [] if self.special[run[0]] is None else [self.special[run[0]]]
            elif special:  # another special token (a role marker): its text, in the teacher's tokens
                theirs = self.theirs(self.tokenizer.decode(run), add_special_tokens=False)["input_ids"]
            else:
                theirs = next(encoded_pieces)
            ours, positions = range(at, at + len(run)), range(len(out), len(out) + len(theirs))
            if special:  # after the same text: the piece's first tokens
                aligned = [(ours[0], positions[0])] if theirs else []
            else:
                starts = {start: b for b, start in zip(positions, itertools.islice(their_starts, len(theirs)))
                          if start is not None}
                aligned = [(a, starts[start]) for a, start in zip(ours, itertools.islice(our_starts, len(run)))
                           if start in starts]
            if train:
                matches.append(TrainedPiece(list(ours), list(positions), aligned))
            out += theirs
            at += len(run)
        return out, matches

    def teacher_batch(self, batch: dict[str, torch.Tensor],
                      keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The teacher's rows (input and position ids), which of their next-token positions are
        matched, and for each of the model's target tokens (`keep`'s order) the index of its
        match among the teacher's matched positions in row-major order (-1: none)."""
        ids, labels, positions = (batch[k].cpu().numpy() for k in ("input_ids", "labels", "position_ids"))
        target_index = (keep.cpu().reshape(-1).long().cumsum(0) - 1).reshape(keep.shape)
        rows, pairs = [], []  # the teacher's tokens and positions per row; (model target index, row, teacher position)
        for r in range(len(ids)):
            starts = [*np.flatnonzero(positions[r] == 0).tolist(), len(ids[r])]
            row: list[int] = []
            row_positions: list[int] = []
            for s, e in zip(starts, starts[1:]):
                theirs, matches = self.teacher_example(ids[r, s:e].tolist(), (labels[r, s:e] != IGNORE_INDEX).tolist())
                for a, b in matched_pairs(matches):
                    pairs.append((int(target_index[r, s + a - 1]), r, len(row) + b))
                row += theirs
                row_positions += range(len(theirs))
            rows.append((row, row_positions))
        width = max(2, max(len(row) for row, _ in rows))
        read_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        read_positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row, row_positions) in enumerate(rows):
            read_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            read_positions[r, :len(row)] = torch.tensor(row_positions, dtype=torch.long)
            read_positions[r, len(row):] = torch.arange(width - len(row))  # padding: an example of its own
        teacher_keep = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        partner = torch.full((int(keep.sum()),), -1, dtype=torch.long)
        for _, r, b in pairs:
            teacher_keep[r, b - 1] = True
        order = (teacher_keep.reshape(-1).long().cumsum(0) - 1).reshape(teacher_keep.shape)
        for index, r, b in pairs:
            partner[index] = order[r, b - 1]
        device = batch["input_ids"].device
        read = {"input_ids": read_ids.to(device), "position_ids": read_positions.to(device)}
        return read, teacher_keep.to(device), partner


def matched_pairs(matches: list[TrainedPiece]) -> Iterator[tuple[int, int]]:
    """(the model's position, the teacher's) of each matched trained token of an example
    (`CrossTokenizerTeacher.teacher_example`), each a target (predicted from the token before
    it in the example)."""
    for piece in matches:
        yield from ((a, b) for a, b in piece.aligned if a > 0 and b > 0)


def text_starts(tokenizer: Any, ids: list[int]) -> list[int | None]:
    """Where the text of each token starts in the text of `ids` (the tokenizer's decode,
    special tokens kept), None where it starts inside a character (byte-level tokens split
    characters of several bytes). Each token's text is the decode of it and the token before
    less that of the token before (a text's first token may decode otherwise: SentencePiece's
    word mark), a few calls in all."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decode = lambda part: backend.decode(part, skip_special_tokens=False)  # noqa: E731
        decode_all = lambda parts: backend.decode_batch(parts, skip_special_tokens=False)  # noqa: E731
    else:
        decode = lambda part: tokenizer.decode(part, skip_special_tokens=False,  # noqa: E731
                                               clean_up_tokenization_spaces=False)
        decode_all = lambda parts: [decode(part) for part in parts]  # noqa: E731
    lefts = [max(0, k - 1) for k in range(len(ids))]
    befores = decode_all([ids[left:k] for k, left in enumerate(lefts)]) if ids else []
    afters = decode_all([ids[left:k + 1] for k, left in enumerate(lefts)]) if ids else []
    starts: list[int | None] = []
    at, since = 0, 0  # the first token after the last boundary between whole characters, and its start
    for k in range(len(ids)):
        starts.append(at if since == k else None)
        left = max(0, since - 1)
        text = afters[k] if since == k else decode(ids[left:k + 1])
        if text.endswith("\ufffd"):  # this token ends inside a character
            continue
        at += len(text) - len(befores[k] if since == k else decode(ids[left:since]))
        since = k + 1
    return starts


def batch_key(batch: dict[str, torch.Tensor]) -> bytes:
    """A training batch's key among those the model answered in this step: its rows and their
    sequence ids (two micro batches of the same records are two batches)."""
    seq_ids = batch["seq_id"].cpu().numpy().tobytes() if "seq_id" in batch else b""
    return round_key(batch) + seq_ids


class DistillLoss:
    """ratio x the teacher-student divergence + (1 - ratio) x the next-token loss, each a mean
    over the batch's target tokens. With a `sampler` and `on_policy` above 0, that share of
    the training batches (chosen by their sequence ids, the same choice on every worker) is
    answered by the model itself (`Sampler`: the records' prompts, its sampled answers) and
    trains on the divergence alone over the sampled tokens, as GKD's on-policy batches; the
    answers are sampled before the step's first update (`step_weights`), which then knows what
    each micro batch averages over."""

    name = "distill"
    columns = ("input_ids", "labels", "position_ids")
    metrics = METRICS

    def __init__(self, teacher: Teacher | PrecomputedTeacher | CrossTokenizerTeacher, kind: str = "forward_kl",
                 temperature: float = 1.0, ratio: float = 0.5, beta: float = 0.5, sampler: Sampler | None = None,
                 on_policy: float = 0.0):
        self.teacher, self.kind, self.temperature, self.ratio, self.beta = teacher, kind, temperature, ratio, beta
        if isinstance(teacher, PrecomputedTeacher):
            self.columns = DistillLoss.columns + (TEACHER_IDS, TEACHER_LOGITS)
        self.sampler, self.on_policy = sampler, on_policy if sampler is not None else 0.0
        self.answered: dict[bytes, dict[str, torch.Tensor]] = {}  # a step's batches answered by the model
        if self.on_policy:
            self.metrics = METRICS + ("on_policy",)  # the share of the trained tokens the model sampled
            self.training_only = ("on_policy",)

    def step_weights(self, model: Any, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """The target tokens of each micro batch of a training step: the answers the model
        samples for those chosen to be on-policy (kept for `loss`), the records' otherwise."""
        self.answered = {}  # the last step's, kept for the log window's weights (`weight`) until now
        for batch, sampled in zip(micro_batches, self.chosen(micro_batches)):
            if sampled:
                prompts, _ = self.sampler.prompts_of(batch)
                answers = self.sampler.sample(model, prompts, 1, True, self.sampler.sampling_seed(batch))
                self.answered[batch_key(batch)] = self.sampler.answer_batch(prompts, answers, 1,
                                                                            batch["input_ids"].device)
        return [float(self.weight(batch)) for batch in micro_batches]

    def chosen(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[bool]:
        """Which micro batches the model answers itself: each a draw from its sequence ids
        (`Sampler.sampling_seed`: a resumed run draws as the uninterrupted one did), summed over
        the workers (a collective: every worker samples in the same micro batches, as ZeRO-3 and
        FSDP gather the weights to generate), below `on_policy`."""
        if not self.on_policy:
            return [False] * len(micro_batches)
        from ft_ray.train.collectives import all_reduce_sum

        seeds = [self.sampler.sampling_seed(batch) for batch in micro_batches]
        draws = all_reduce_sum([seed / 2 ** 63 if seed is not None else float(torch.rand(())) for seed in seeds])
        return [draw % 1.0 < self.on_policy for draw in draws]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        answered = self.answered.get(batch_key(batch)) if unwrapped(model).training else None
        if answered is None:
            loss, metrics = self.divergence_loss(model, batch, self.ratio)
            return loss, {**metrics, "on_policy": 0.0} if self.on_policy else metrics
        loss, metrics = self.divergence_loss(model, answered, 1.0)
        return loss, {**metrics, "on_policy": float(self.weight(batch))}

    def divergence_loss(self, model: Any, batch: dict[str, torch.Tensor],
                        ratio: float) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        keep = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep]
        count = max(1, len(targets))
        t = self.temperature
        teacher = self.teacher.divergence_of(batch, keep, self.kind, self.beta, t)
        sums = torch.zeros(2, dtype=torch.float32, device=labels.device)

        def loss_of(start: int, logits: torch.Tensor) -> torch.Tensor:
            end = start + len(logits)
            apart = teacher(start, end, logits / t) * t * t
            nll = F.cross_entropy(logits, targets[start:end], reduction="none")
            sums.add_(torch.stack([apart.sum(), nll.sum()]).detach())
            return (ratio * apart.sum() + (1 - ratio) * nll.sum()) / count

        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if has_chunked_head(unwrapped(model)):
            loss = model(**inputs, row_loss_of=(labels, loss_of))["loss"]
        else:
            loss = loss_of(0, model(**inputs).logits[:, :-1][keep].float())
        divergence_sum, nll_sum = sums.tolist()
        return loss, {"divergence": divergence_sum, "next_token_loss": nll_sum}

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The batch's target tokens: of the model's answers where this step answered it itself."""
        answered = self.answered.get(batch_key(batch)) if self.answered else None
        return int(((answered or batch)["labels"][:, 1:] != IGNORE_INDEX).sum())


def load_teacher(config: JobConfig, device: torch.device, sharded: bool = False) -> Any:
    """The job's teacher (`JobConfig.teacher`), frozen, on `device`: in 4-bit with the job's
    quantization under QLoRA (the rest in its compute dtype), else in the compute dtype (fp32
    for fp32 runs), with the student's per-example attention in packed batches. `sharded`
    (training workers under fsdp or ZeRO-3: `JobConfig.sharded_weights`): sharded across the
    workers as the student is, each layer gathered for its forward. Under fsdp (`shard_model`)
    it is loaded on the CPU first, so no worker holds it whole on its GPU (a QLoRA teacher's
    4-bit weights are quantized there first, as the student's), and where the job loads on
    rank 0 (`JobConfig.loads_on_rank0`) rank 0 alone reads its weights, the others building it
    empty (`fsdp_engine.builds_empty`) for their shards of rank 0's; under ZeRO-3 it is built
    partitioned, rank 0 alone reading its weights (`JobConfig.partitions_at_load`), else
    DeepSpeed's engine (`preference.sharded_for_inference`, as the inline reference's) moves it
    whole to the GPU before it partitions it."""
    from ft_ray.models import load_base_model, load_quantized_model
    from ft_ray.train.deepspeed_engine import partitioned_at_load
    from ft_ray.train.engine_api import COMPUTE_DTYPES
    from ft_ray.train.fsdp_engine import builds_empty

    if config.method == "qlora":
        model = load_quantized_model(config.teacher, config.quantization, False, frozen=True)
    else:  # under fsdp, empty on the workers that take its weights from rank 0 (`fsdp_engine.builds_empty`)
        with partitioned_at_load(config):  # ZeRO-3: built partitioned
            model = load_base_model(config.teacher, dtype=COMPUTE_DTYPES.get(config.train.precision),
                                    empty=sharded and builds_empty(config))
        model = model if sharded else model.to(device)
    if config.data.pack and config.model.attn_implementation == "sdpa":
        from ft_ray.train.attention import register

        model.set_attn_implementation(register())
    model.eval().requires_grad_(False)
    if sharded and config.zero3:
        from ft_ray.train.preference import sharded_for_inference

        return sharded_for_inference(model, config, f"distill.teacher {config.distill.teacher}")
    if sharded:
        from ft_ray.train.fsdp_engine import shard_model

        shard_model(model, config, device, trains=False, from_rank0=config.loads_on_rank0)
    return model


def build_distill_objective(config: JobConfig, model: Any) -> DistillLoss:
    from ft_ray.console import LOG
    from ft_ray.models import load_tokenizer, model_config
    from ft_ray.train.engine_api import worker_device

    distill = config.distill
    tokenizer = load_tokenizer(config.model)
    uld = distill.divergence == "uld"
    if config.precomputes_teacher:  # for uld the two tokenizers, for the tokens they share
        precomputed = PrecomputedTeacher(CrossTokenizerTeacher(
            None, tokenizer, load_tokenizer(config.teacher), distill.uld_shared_tokens),
            model_config(config.teacher).vocab_size) if uld else PrecomputedTeacher()
        return DistillLoss(precomputed, distill.divergence, distill.temperature, distill.ratio)
    sharded = config.sharded_weights  # the teacher sharded as the student is
    teacher = load_teacher(config, worker_device(config.distributed.use_gpu), sharded)
    if uld:  # the teacher reads the text in its own tokens
        reader: Teacher | CrossTokenizerTeacher = CrossTokenizerTeacher(Teacher(teacher, sharded), tokenizer,
                                                                         load_tokenizer(config.teacher),
                                                                         distill.uld_shared_tokens)
    else:
        reader = Teacher(teacher, sharded)
        heads = [causal_lm(unwrapped(m)).get_output_embeddings().weight for m in (model, teacher)]
        sizes = [getattr(w, "ds_shape", w.shape)[0] for w in heads]  # (ZeRO-3's partitioned weight: ds_shape)
        if sizes[0] != sizes[1]:
            LOG.info(f"note: the output layers of the model ({sizes[0]} rows) and the teacher ({sizes[1]}) differ in "
                     f"size: the divergence is taken over the {min(sizes)} rows they share (the tokenizer's)")
    sampler = None
    if distill.on_policy:
        sampler = Sampler(tokenizer, distill.max_new_tokens, distill.sampling_temperature, config.train.seed)
    return DistillLoss(reader, distill.divergence, distill.temperature, distill.ratio, distill.jsd_beta, sampler,
                       distill.on_policy)


# ---------------------------------------------------------------- the precomputed teacher

TEACHER_IDS = "teacher_ids"  # per token of a packed row: the teacher's top-k next tokens (0 where no target)
TEACHER_LOGITS = "teacher_logits"  # and their logits at temperature 1, float16


class TeacherScorer(BlockScorer):
    """A model actor (`with_teacher`): the teacher, adding its top `distill.top_k` tokens and
    their logits at each target token to packed rows (over the output rows it shares with the
    model). For uld the teacher reads the rows in its own tokens (`CrossTokenizerTeacher`) and
    its top tokens (its own ids, over all its rows) and logits are kept at the model's target
    tokens it matches (logits -inf at the others)."""

    def load(self) -> Any:
        from ft_ray.models import load_tokenizer, model_config

        model = load_teacher(self.job, self.device)
        rows = causal_lm(model).get_output_embeddings().weight.shape[0]
        self.uld = self.job.distill.divergence == "uld"
        self.rows = rows if self.uld else min(rows, getattr(model_config(self.job.model), "vocab_size", None) or rows)
        self.k = min(self.job.distill.top_k, self.rows)
        self.teacher = Teacher(model)
        if self.uld:
            self.reader = CrossTokenizerTeacher(self.teacher, load_tokenizer(self.job.model),
                                                load_tokenizer(self.job.teacher))
        return model

    def columns_of(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        labels = batch["labels"]
        keep = labels[:, 1:] != IGNORE_INDEX
        if self.uld:
            read, read_keep, partner = self.reader.teacher_batch(batch, keep)
            logits, count = self.teacher.at(read, read_keep), int(read_keep.sum())
        else:
            logits, count = self.teacher.at(batch, keep), int(keep.sum())
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * self.rows))  # target tokens whose fp32 logits exist at once
        tops = [logits(start, min(count, start + chunk))[:, :self.rows].topk(self.k, dim=-1)
                for start in range(0, count, chunk)]
        values = torch.zeros(*labels.shape, self.k, dtype=torch.float16)
        ids = torch.zeros(*labels.shape, self.k, dtype=torch.int32)
        found = torch.cat([top.values for top in tops]).half().cpu() if tops else torch.zeros(0, self.k).half()
        found_ids = torch.cat([top.indices for top in tops]).int().cpu() if tops else torch.zeros(0, self.k).int()
        if self.uld:  # the model's target tokens, those with the teacher's match first
            matched = partner >= 0
            taught = torch.full((len(partner), self.k), -math.inf, dtype=torch.float16)
            taught[matched] = found[partner[matched]]
            found, found_ids = taught, torch.zeros((len(partner), self.k), dtype=torch.int32).index_put(
                (matched,), found_ids[partner[matched]])
        values[:, :-1][keep.cpu()] = found
        ids[:, :-1][keep.cpu()] = found_ids
        return {TEACHER_IDS: ids.numpy(), TEACHER_LOGITS: values.numpy()}

    def empty(self, width: int) -> dict[str, Any]:
        return {TEACHER_IDS: np.zeros((0, width, self.k), dtype=np.int32),
                TEACHER_LOGITS: np.zeros((0, width, self.k), dtype=np.float16)}


def with_teacher(config: JobConfig, datasets: dict[str, Any]) -> dict[str, Any]:
    """The packed datasets with the teacher's top-k logits at every target token (`with_columns`)."""
    own = " in its own tokens" if config.distill.divergence == "uld" else ""
    return with_columns(config, datasets, TeacherScorer, "teacher",
                        f"top-{config.distill.top_k} logits of {config.distill.teacher}{own} at every trained token")


def check_teacher(config: JobConfig, tokenizer: Any) -> str:
    """What a driver checks of `distill.teacher` before a run (no weights loaded): its config
    names a causal LM with an output row for each of the model's tokens, and its tokenizer is
    the model's (`tokenizer`), token for token (divergence uld: any tokenizer, an output row for
    each of its tokens). Returns a line saying what it is.

    Raises:
        InputError: it is not there, not such a model, or its tokens differ from the model's."""
    from ft_ray.models import load_tokenizer, model_config

    teacher = config.teacher
    name = teacher.name_or_path
    try:
        theirs = load_tokenizer(teacher)
        shape = model_config(teacher)
    except (InputError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0].removeprefix("model.name_or_path: ")
        raise InputError(f"distill.teacher: {first}") from None
    architectures = getattr(shape, "architectures", None) or []
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise InputError(f"distill.teacher: {name} is {', '.join(architectures)}; a teacher is a causal LM "
                         "(AutoModelForCausalLM) whose next-token distributions the model learns")
    ours, vocab = tokenizer.get_vocab(), theirs.get_vocab()
    rows = getattr(shape, "vocab_size", None)
    # where the workers hold it: precomputed, none of them; under fsdp and ZeRO-3 a shard each
    held = (f", its top-{config.distill.top_k} logits computed before training" if config.precomputes_teacher
            else ", sharded across the workers as the model is" if config.sharded_weights else "")
    if config.distill.divergence == "uld":
        if rows is not None and rows < len(theirs):
            raise InputError(f"distill.teacher: {name} has {rows} output rows for its tokenizer of {len(theirs)} tokens")
        own = "the model's tokenizer" if ours == vocab else f"its own tokenizer ({len(theirs)} tokens)"
        if config.distill.uld_shared_tokens:
            shared = CrossTokenizerTeacher(None, tokenizer, theirs, shares_tokens=True).shared_for(
                len(tokenizer), rows or len(theirs))  # as the workers pair them, the model's rows as its tokens
            own += (f", {int(shared.ours.sum())} of its tokens also the model's, compared token by token, "
                    "the others sorted")
        return (f"distill: teacher {name} (uld, {own}, temperature {config.distill.temperature:g}, "
                f"ratio {config.distill.ratio:g}{held})")
    if ours != vocab:
        differing = sorted(set(ours.items()) ^ set(vocab.items()), key=lambda item: item[1])[:3]
        shown = ", ".join(f"{token!r}: {index}" for token, index in differing)
        raise InputError(f"distill.teacher: {name}'s tokenizer is not the model's ({len(vocab)} tokens against "
                         f"{len(ours)}; first differing: {shown}): distillation compares the two models' "
                         "distributions token by token, so the teacher must share the model's tokenizer (a larger "
                         "model of the same family), or set distill.divergence: uld")
    if rows is not None and rows < len(tokenizer):
        raise InputError(f"distill.teacher: {name} has {rows} output rows for a tokenizer of {len(tokenizer)} tokens")
    return (f"distill: teacher {name} ({config.distill.divergence}, temperature {config.distill.temperature:g}, "
            f"ratio {config.distill.ratio:g}{held})")
