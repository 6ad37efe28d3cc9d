"""The forward that scores completions: the LM head only where a label is predicted, rows packed without
padding, and each prompt computed once for all the completions that follow it.

A batch's rows are right-padded prompt + completion sequences with labels -100 on the prompt and on
padding. Three ways through the model, each giving the same log-probs:

- padded: the rows as they are (`model.padding_free=false`);
- packed (`pack_rows`): the sequences laid end to end in one row, position ids restarting per sequence, so
  no position is padding. halos' attention (`models.SDPA`) attends within each sequence (`models.Segments`);
  other kernels get the same from the position ids (flash-attention's variable-length path, or the
  block-diagonal mask transformers builds);
- shared prompts (`share_prompt_rows`, `model.share_prompts`): rows with the same prompt tokens (a pair's
  chosen and rejected, KTO's target and KL rows of one prompt, a GRPO group) become one segment: the
  prompt once, then each completion, with position ids continuing from the prompt for every completion
  and a mask under which a completion attends to the prompt and to itself only. The prompt's last
  position predicts the first token of every completion. Needs halos' attention, which takes each
  segment's own mask, and a causal model without a sliding window; `segment_attention_supported` says when.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from halos.batch import IGNORE_INDEX
from halos.errors import ConfigError
from halos.lora import unwrapped
from models import SDPA, Segments


def pack_rows(lengths: torch.Tensor, **tensors: torch.Tensor) -> Dict:
    """Lay right-padded [B, T] rows of the given `lengths` end to end in one row [1, sum(lengths)]. Returns
    each tensor packed, `position_ids` (0, 1, ... within each sequence) and `segments` (models.Segments:
    each sequence attends causally to itself only)."""
    width = next(iter(tensors.values())).shape[1]
    positions = torch.arange(width, device=lengths.device).expand(len(lengths), width)
    is_token = positions < lengths.unsqueeze(1)                       # [B, T]; row-major order: rows end to end
    packed = {name: t[is_token].unsqueeze(0) for name, t in tensors.items()}
    packed['position_ids'] = positions[is_token].unsqueeze(0)
    bounds = tuple((end - n, end) for end, n in zip(lengths.cumsum(0).tolist(), lengths.tolist()) if n > 0)
    packed['segments'] = Segments(bounds, (None,) * len(bounds))
    return packed


@dataclass(frozen=True)
class SharedPromptRows:
    """Prompt segments laid end to end in one row, each prompt followed by its completions; L positions,
    K = the label tokens scored."""
    input_ids: torch.Tensor     # [1, L]
    position_ids: torch.Tensor  # [1, L]: 0.. over the prompt, continuing from it for every completion
    segments: Segments          # one per prompt, with its mask (`prompt_or_own_completion`; None: one completion)
    predictor: torch.Tensor     # [K] the position that predicts each label token
    targets: torch.Tensor       # [K] the label tokens
    rows: torch.Tensor          # [K] the original row of each label token
    positions: torch.Tensor     # [K] its predicting position t in the original row (label t + 1)
    flat_index: torch.Tensor    # [B, T] the position of each original token (its prompt's one copy); -1 on padding


def prompt_lengths(labels: torch.Tensor, lengths: torch.Tensor) -> List[int]:
    """[B] the number of leading positions labelled -100 (the prompt), at most the row's length."""
    is_label = labels != IGNORE_INDEX
    first = torch.where(is_label.any(1), is_label.int().argmax(1), lengths)
    return torch.minimum(first, lengths).tolist()


def prompt_or_own_completion(part: torch.Tensor) -> torch.Tensor:
    """The [1, 1, n, n] bool mask of a segment whose n positions belong to `part` (0: the prompt, i: the i-th
    completion): causal, and a completion attends to the prompt and to itself only."""
    causal = torch.ones(len(part), len(part), dtype=torch.bool, device=part.device).tril()
    visible = (part.unsqueeze(0) == 0) | (part.unsqueeze(1) == part.unsqueeze(0))  # key in the prompt or own part
    return (causal & visible)[None, None]


def share_prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> SharedPromptRows:
    """Group the [B, T] right-padded rows by their prompt tokens and lay the groups (the prompt, then each
    member's completion) end to end in one row, a segment per group."""
    lengths = attention_mask.sum(1).tolist()
    prompts = prompt_lengths(labels, attention_mask.sum(1))
    groups: Dict[Tuple, List[int]] = {}
    for row, p in enumerate(prompts):
        key = tuple(input_ids[row, :p].tolist()) if p > 0 else ('no prompt', row)
        groups.setdefault(key, []).append(row)
    device = input_ids.device

    def arange(start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=device)

    ids, position_ids, bounds, masks = [], [], [], []
    predictor, targets, rows_of, positions = [], [], [], []
    flat_index = torch.full_like(input_ids, -1, dtype=torch.long)
    at = 0
    for rows in groups.values():
        start, p = at, prompts[rows[0]]
        ids.append(input_ids[rows[0], :p])
        position_ids.append(arange(0, p))
        parts = [torch.zeros(p, dtype=torch.long, device=device)]
        at += p
        for member, row in enumerate(rows, start=1):
            c = lengths[row] - p
            flat_index[row, :p] = arange(start, start + p)
            flat_index[row, p:p + c] = arange(at, at + c)
            ids.append(input_ids[row, p:p + c])
            position_ids.append(arange(p, p + c))
            parts.append(torch.full((c,), member, dtype=torch.long, device=device))
            tokens = arange(p, p + c)                    # their positions in the original row
            predicts = arange(at - 1, at + c - 1)        # the positions that predict them
            predicts[:1] = start + p - 1                 # the first: the prompt's last
            scored = (tokens >= 1) & (labels[row, p:p + c] != IGNORE_INDEX)
            predictor.append(predicts[scored])
            targets.append(input_ids[row, p:p + c][scored])
            rows_of.append(torch.full((int(scored.sum()),), row, device=device))
            positions.append(tokens[scored] - 1)
            at += c
        if at > start:  # an empty row has no segment
            bounds.append((start, at))  # a prompt with one completion is plain causal: the faster kernel
            masks.append(prompt_or_own_completion(torch.cat(parts)) if len(rows) > 1 else None)
    return SharedPromptRows(torch.cat(ids).unsqueeze(0), torch.cat(position_ids).unsqueeze(0),
                            Segments(tuple(bounds), tuple(masks)), torch.cat(predictor), torch.cat(targets).long(),
                            torch.cat(rows_of).long(), torch.cat(positions), flat_index)


def segment_attention_supported(model: torch.nn.Module) -> bool:
    """Whether the model attends within `models.Segments`: halos' attention (`models.SDPA`) on a model whose own
    mask is plain causal (segments would drop a sliding window). Shared prompts need it; packed rows without it
    are told apart by their position ids (transformers' block-diagonal mask, flash-attention's varlen path)."""
    config = unwrapped(model).config
    sliding = getattr(config, 'sliding_window', None) and getattr(config, 'use_sliding_window', True)
    return config._attn_implementation == SDPA and not sliding


def forward_over_segments(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          segments: Segments, **kwargs):
    """model(...) over one packed [1, L] row whose sequences are `segments`. With segment attention the
    attention runs within each segment, and an all-ones attention_mask keeps transformers from building the
    row's [L, L] mask (which that attention ignores); otherwise the position ids tell the sequences apart.
    Raises when the model never hands the segments to its attention, which would then cross sequences."""
    if not segment_attention_supported(model):
        if any(mask is not None for mask in segments.masks):
            raise ConfigError("shared prompts need halos' attention (models.SDPA): set model.share_prompts=false")
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
    output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                   halos_segments=segments, use_cache=False, **kwargs)
    if not segments.read_by:
        raise ConfigError(f"{type(unwrapped(model)).__name__} does not pass the keyword halos_segments on to its "
                          "attention, so packed sequences would attend to each other: set model.padding_free=false")
    return output


def label_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[K, V] logits and [K] targets -> [K] log-probs in fp32 (a gather after one logsumexp)."""
    logits = logits.float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def entropies(logits: torch.Tensor, log_normalisers: torch.Tensor) -> torch.Tensor:
    """[K, V] logits and their [K] logsumexp -> [K] entropies of the next-token distributions,
    H = logsumexp(z) - sum_v softmax(z)_v z_v (a monitor: no gradient; one exp over the logits, in place)."""
    logits = logits.float()
    weighted = (logits - log_normalisers.unsqueeze(1)).exp_().mul_(logits)
    return log_normalisers - weighted.sum(-1)


def shared_prompt_token_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              labels: torch.Tensor, entropy: bool = False) -> Tuple:
    """completion_token_logps with every prompt computed once (`share_prompt_rows`); the LM head runs once
    at each predicting position, a prompt's last position serving all its completions."""
    shared = share_prompt_rows(input_ids, attention_mask, labels)
    keep = torch.zeros(shared.input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    keep[shared.predictor] = True
    logits = forward_over_segments(model, shared.input_ids, shared.position_ids, shared.segments,
                                   logits_to_keep=keep.view_as(shared.input_ids)).logits
    logits = logits.reshape(-1, logits.shape[-1])                       # [kept positions, V], in flat order
    kept_index = keep.long().cumsum(0) - 1                              # flat position -> its row of `logits`
    log_normalisers = torch.logsumexp(logits.float(), dim=-1)           # once per kept position
    predicting = kept_index[shared.predictor]                           # [K]
    token_logps = logits[predicting, shared.targets].float() - log_normalisers[predicting]
    token_entropies = entropies(logits, log_normalisers)[predicting] if entropy else None
    return token_logps, shared.rows, shared.positions, token_entropies


def classifier_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, share_prompts: bool = False) -> torch.Tensor:
    """A sequence classifier's (a reward model's) logits [B, labels] for right-padded [B, T] rows. With
    `share_prompts` each prompt runs once (`share_prompt_rows`, as for log-probs) and the logits are read
    where transformers' classifiers pool: at each row's last token that is not the pad token. They are read
    from the per-position output of the model's `score` head (a forward hook: the model itself pools over
    the packed row, which means nothing), so the call still goes through the model's own forward (FSDP,
    LoRA). Models without a `score` head take the padded forward."""
    head = getattr(unwrapped(model), 'score', None)
    if not share_prompts or head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    shared = share_prompt_rows(input_ids, attention_mask, labels)
    per_position = []
    hook = head.register_forward_hook(lambda module, args, output: per_position.append(output))
    try:
        forward_over_segments(model, shared.input_ids, shared.position_ids, shared.segments)
    finally:
        hook.remove()
    scores = per_position[0].reshape(-1, per_position[0].shape[-1])   # [L, labels]
    is_token = (input_ids != unwrapped(model).config.get_text_config().pad_token_id) & attention_mask.bool()
    last_token = (torch.arange(input_ids.shape[1], device=input_ids.device) * is_token).argmax(-1)  # [B]
    return scores[shared.flat_index[torch.arange(len(input_ids), device=input_ids.device), last_token]]


def completion_token_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, padding_free: bool = True, share_prompts: bool = False,
                           entropy: bool = False):
    """The log-prob of every label token of right-padded [B, T] rows under `model`, in fp32.

    The LM head runs only at the K positions that predict a label (transformers' boolean
    `logits_to_keep`), so no [B, T, V] logits tensor exists: prompt and padding positions cost no
    vocabulary projection. With `padding_free` the rows are first packed (`pack_rows`); with
    `share_prompts` rows of one prompt share it (`shared_prompt_token_logps`).
    Returns (token log-probs [K], their row [K], their predicting position t in the row [K], and with `entropy`
    the entropy of each predicting position's distribution [K], else None).
    """
    if share_prompts:
        return shared_prompt_token_logps(model, input_ids, attention_mask, labels, entropy)
    predicts_label = torch.zeros_like(attention_mask, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX            # position t predicts token t+1
    next_labels = torch.roll(labels, -1, dims=1)                      # [B, T]: the token each position predicts
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(labels)
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    if padding_free:
        packed = pack_rows(attention_mask.sum(1), input_ids=input_ids, predicts_label=predicts_label,
                           next_labels=next_labels, rows=rows, positions=positions)
        input_ids, predicts_label, next_labels, rows, positions = (
            packed[key] for key in ('input_ids', 'predicts_label', 'next_labels', 'rows', 'positions'))
        logits = forward_over_segments(model, input_ids, packed['position_ids'], packed['segments'],
                                       logits_to_keep=predicts_label).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=predicts_label,
                       use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()            # [K, V], row by row
    log_normalisers = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(1, next_labels[predicts_label].unsqueeze(1)).squeeze(1) - log_normalisers
    return (token_logps, rows[predicts_label], positions[predicts_label],
            entropies(logits, log_normalisers) if entropy else None)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, padding_free: bool = True, share_prompts: bool = False) -> torch.Tensor:
    """Summed log-probs of each row's label tokens under `model`: [B, T] right-padded rows -> [B], in fp32
    (see completion_token_logps)."""
    token_logps, rows, _, _ = completion_token_logps(model, input_ids, attention_mask, labels, padding_free,
                                                     share_prompts)
    return torch.zeros(len(labels), device=token_logps.device).index_add(0, rows, token_logps)


def token_level_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, padding_free: bool = True, share_prompts: bool = False,
                      entropy: bool = False):
    """Per-token log-probs [B, T-1] (position t: the log-prob of token t+1; 0 where it is not a label), computed
    like sequence_logps (completion-only LM head, packed rows, shared prompts); with `entropy` also the entropy
    [B, T-1] of each of those next-token distributions (no gradient)."""
    token_logps, rows, positions, token_entropies = completion_token_logps(
        model, input_ids, attention_mask, labels, padding_free, share_prompts, entropy)
    placed = lambda values: torch.zeros(labels.shape[0], labels.shape[1] - 1, device=values.device,
                                        dtype=values.dtype).index_put((rows, positions), values)
    return (placed(token_logps), placed(token_entropies)) if entropy else placed(token_logps)
