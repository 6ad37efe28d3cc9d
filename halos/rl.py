"""The token-level RL family's machinery (offline and online PPO, GRPO): experience microbatches, rollout
rows, per-token forwards, rewards on the last token, and the reshuffle of an optimizer step's experience
across microbatches and ranks.

Token-level tensors are [rows, T] like the sequences, with position t holding the value for the
prediction of token t+1 (so their last column is always 0); `mask` is 1 on completion tokens.
"""
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Tuple

import torch

from halos.batch import IGNORE_INDEX, Sequences
from halos.losses import group_advantages
from utils import all_gather_rows, get_batch_logps, get_rank, get_world_size, is_distributed, pad_to_length


@dataclass(frozen=True)
class Experience:
    """One microbatch of experience."""
    input_ids: torch.Tensor       # [rows, T] prompt + completion
    attention_mask: torch.Tensor  # [rows, T]
    labels: torch.Tensor          # [rows, T] -100 on prompt and padding
    old_logps: torch.Tensor       # [rows, T] token log-probs of the behaviour ("old") policy
    mask: torch.Tensor            # [rows, T] 1 where position t predicts a completion token
    advantages: torch.Tensor      # [rows, T]
    value_targets: torch.Tensor   # [rows, T]
    token_weights: torch.Tensor   # [rows, T] the mask times each row's weight: what the loss's means weigh by

    def trimmed(self) -> 'Experience':
        """Cut to the longest sequence; the token-level tensors to one column less (the predictions)."""
        longest = int(self.attention_mask.sum(1).max())
        return Experience(*(getattr(self, f.name)[:, :longest if f.name in SEQUENCE_FIELDS else longest - 1]
                            for f in fields(self)))


SEQUENCE_FIELDS = ('input_ids', 'attention_mask', 'labels')


@dataclass(frozen=True)
class Rollout:
    """The completions of one microbatch, scored: what the experience is built from."""
    sequences: Sequences          # [rows, T] prompt + completion
    weights: torch.Tensor         # [rows]
    scores: torch.Tensor          # [rows] each sequence's reward, placed on its last completion token
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # what the rollout logs (e.g. the raw scores)


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """[rows, T] labels -> [rows, T-1] float mask of the positions that predict a completion token."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def rewards_on_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[rows] sequence scores -> [rows, T-1] token rewards: each score on its row's last completion token."""
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), mask.cumsum(1).argmax(1)] = scores.float()
    return rewards


def rollout_sequences(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: List[List[int]],
                      pad_token_id: int) -> Sequences:
    """[B, P] left-padded prompts and each one's sampled completion tokens -> prompt + completion rows,
    right-padded, labelled on the completion only."""
    return rollout_sequences_of([ids[mask.bool()] for ids, mask in zip(prompt_ids, prompt_mask)], completions,
                                pad_token_id)


def rollout_sequences_of(prompts: List[torch.Tensor], completions: List[List[int]], pad_token_id: int) -> Sequences:
    """Each prompt's tokens (unpadded) and its sampled completion tokens -> prompt + completion rows,
    right-padded, labelled on the completion only."""
    rows, labels = [], []
    for prompt, completion in zip(prompts, completions):
        prompt = prompt.tolist()
        rows.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion)
    length = max(len(row) for row in rows)
    padded = lambda lists, value: torch.tensor([values + [value] * (length - len(values)) for values in lists])
    return Sequences(padded(rows, pad_token_id), padded([[1] * len(row) for row in rows], 0), padded(labels, IGNORE_INDEX))


def full_length(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[rows, T-1] token-level values padded with one 0 column to the sequences' length T."""
    return pad_to_length(tokens, length, 0)


def token_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                autocast: Callable) -> torch.Tensor:
    """[rows, T-1] masked log-probs of each completion token under `model` (one padded forward)."""
    with autocast():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return get_batch_logps(logits, labels, token_level=True)


def reshuffled(experience: List[Experience], seed: int, rank: int, world_size: int,
               pad_token_id: int) -> List[Experience]:
    """The experience's rows gathered from every rank, permuted (the same seeded permutation on every rank)
    and cut back into microbatches of the same sizes: this rank's slice of each, trimmed."""
    padding = {f.name: 0 for f in fields(Experience)}
    padding.update(input_ids=pad_token_id, labels=IGNORE_INDEX)
    gathered = {name: [all_gather_rows(getattr(part, name), pad) for part in experience] for name, pad in padding.items()}
    length = max(t.shape[1] for t in gathered['input_ids'])
    rows = {name: torch.cat([pad_to_length(t, length, padding[name]) for t in parts]) for name, parts in gathered.items()}
    sizes = [t.shape[0] for t in gathered['input_ids']]
    permutation = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed)).to(rows['input_ids'].device)
    return [Experience(**{name: values[indices.tensor_split(world_size)[rank]] for name, values in rows.items()}).trimmed()
            for indices in permutation.split(sizes)]


def with_advantages(experience: List[Experience], advantages: List[torch.Tensor]) -> List[Experience]:
    return [replace(part, advantages=values) for part, values in zip(experience, advantages)]


def masked_stats(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the masked entries."""
    selected = values[mask.bool()]
    return selected.mean(), selected.var(unbiased=False)


def group_advantages_across_ranks(scores: torch.Tensor, group_ids: List[str], eps: float,
                                  unbiased: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of this rank's completions [rows], with each group's statistics over the completions
    of every rank (the global microbatch holds whole groups), so that 2 processes give what 1 process gives.
    Also [rows] bool: the completion's group has one completion or all-equal scores (it gets no gradient)."""
    all_scores, all_ids, start = scores, list(group_ids), 0
    if is_distributed():
        gathered_ids = [None] * get_world_size()
        torch.distributed.all_gather_object(gathered_ids, list(group_ids))
        all_scores = all_gather_rows(scores.unsqueeze(1), 0.0).squeeze(1)
        all_ids = [group for part in gathered_ids for group in part]
        start = sum(len(part) for part in gathered_ids[:get_rank()])
    members = {}
    for score, group in zip(all_scores.tolist(), all_ids):
        members.setdefault(group, []).append(score)
    degenerate = torch.tensor([len(set(members[group])) == 1 for group in all_ids], device=scores.device)
    advantages = group_advantages(all_scores, all_ids, eps, unbiased)
    rows = slice(start, start + len(group_ids))
    return advantages[rows], degenerate[rows]
