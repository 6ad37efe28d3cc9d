"""The batch schema: the one module that spells the keys of a batch.

A loader yields a dict per microbatch (HALOs' flat keys, which users' code may still read):

    prompt_text                              [B] prompt strings (after truncation)
    prompt_input_ids, prompt_attention_mask  [B, P] the prompt tokens, left-padded (for generation)
    for each sequence kind k in the batch (TARGET; CHOSEN and REJECTED; KL):
      k_text                                 [B] completion strings
      k_input_ids, k_attention_mask          [B, C] the completion tokens alone, right-padded
      k_combined_text                        [B] prompt + completion strings
      k_combined_input_ids,                  [B, T] prompt + completion tokens, right-padded
      k_combined_attention_mask
      k_labels                               [B, T] the combined ids with -100 on the prompt and on padding
    is_desirable                             [B] bool, for unpaired (desirable / undesirable) items
    weight                                   [B] float, each item's weight in the loss (pairs: the pair's)
    score, prompt_id                         [B] float and [B] str, for scored completions grouped by prompt (GRPO)
    prompt_turns                             [B] the prompt as {role, content} turns (for samplers)
    prompt_as_given                          [B] the prompt as its record gave it, a string or turns (for labellers)
    dataset                                  [B] the prompt's dataset (prompt batches, for sampling)
    original_prompt                          [B] the raw instruction (SFT items)

Trainers read it through the typed views below (`Sequences.of`, `Sequences.stacked`, `labelled_completions`)
and never rebuild key names.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from utils import pad_to_length

TARGET, CHOSEN, REJECTED, KL = 'target', 'chosen', 'rejected', 'KL'
KINDS = (TARGET, CHOSEN, REJECTED, KL)
PROMPT = 'prompt'
PROMPT_TEXT, PROMPT_INPUT_IDS, PROMPT_ATTENTION_MASK = 'prompt_text', 'prompt_input_ids', 'prompt_attention_mask'
IS_DESIRABLE = 'is_desirable'
SCORE, PROMPT_ID = 'score', 'prompt_id'  # [B] float scores of scored completions (GRPO), [B] ids of their prompts
WEIGHT = 'weight'  # [B] float: each item's weight in the loss (1 unless the data says otherwise)
PROMPT_TURNS, DATASET = 'prompt_turns', 'dataset'  # [B] each prompt as {role, content} turns, [B] its dataset
PROMPT_AS_GIVEN = 'prompt_as_given'  # [B] each prompt as its record gave it: its text, or its turns
PROMPT_EXTRA = 'prompt_extra'  # [B] each prompt's own fields in its prompts file ({} for none), by name
REPEATED = 'repeated'  # [B] bool: a prompt repeated to fill a batch that divides among the processes
ORIGINAL_PROMPT = 'original_prompt'
IGNORE_INDEX = -100  # the label of a position that is not scored


# the fields of each sequence kind: key(kind, field), e.g. key(CHOSEN, LABELS) == 'chosen_labels'
TEXT, IDS, MASK = 'text', 'input_ids', 'attention_mask'                       # the completion alone
COMBINED_TEXT, COMBINED_IDS, COMBINED_MASK = 'combined_text', 'combined_input_ids', 'combined_attention_mask'
LABELS = 'labels'


def key(kind: str, field: str) -> str:
    return f'{kind}_{field}'


def sequence_fields(kind: str, prompt_text: str, prompt_ids: List[int], text: str, ids: List[int]) -> Dict:
    """The element fields of one completion of kind `kind` after its prompt (token lists, not yet padded)."""
    fields = {TEXT: text, IDS: ids, MASK: [1] * len(ids), COMBINED_TEXT: prompt_text + text,
              COMBINED_IDS: prompt_ids + ids, COMBINED_MASK: [1] * (len(prompt_ids) + len(ids)),
              LABELS: [IGNORE_INDEX] * len(prompt_ids) + ids}
    return {key(kind, field): value for field, value in fields.items()}


def prompt_fields(prompt_text: str, prompt_ids: List[int]) -> Dict:
    return {PROMPT_TEXT: prompt_text, PROMPT_INPUT_IDS: prompt_ids, PROMPT_ATTENTION_MASK: [1] * len(prompt_ids)}


def collate(elements: List[Dict], pad_token_id: int) -> Dict:
    """Pad token lists into tensors: ids with the pad token, masks with 0, labels with -100.

    The prompt's tokens are left-padded (for generation), every other token list right-padded; booleans
    become a bool tensor and other values stay lists.
    """
    batch = {}
    for key in elements[0]:
        values = [element[key] for element in elements]
        if key.endswith('_input_ids') or key.endswith('_attention_mask') or key.endswith('_labels'):
            pad = pad_token_id if key.endswith('_input_ids') else (0 if key.endswith('_attention_mask') else IGNORE_INDEX)
            length = max(len(v) for v in values)
            left = key.startswith(PROMPT)
            batch[key] = torch.tensor([[pad] * (length - len(v)) + v if left else v + [pad] * (length - len(v))
                                       for v in values], dtype=torch.long)
        elif key == IS_DESIRABLE:
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif key in (SCORE, WEIGHT):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


def batch_size(batch: Dict) -> int:
    """The number of items (prompts) of a batch."""
    return len(batch[PROMPT_TEXT])


def kinds(batch: Dict) -> Tuple[str, ...]:
    """The sequence kinds a batch holds."""
    return tuple(kind for kind in KINDS if key(kind, COMBINED_IDS) in batch)


@dataclass(frozen=True)
class Sequences:
    """Prompt + completion rows; every tensor is [rows, T], right-padded."""
    input_ids: torch.Tensor       # padded with pad_token_id
    attention_mask: torch.Tensor  # 1 on real tokens
    labels: torch.Tensor          # the ids, with -100 on the prompt and on padding

    @classmethod
    def of(cls, batch: Dict, kind: str) -> 'Sequences':
        return cls(batch[key(kind, COMBINED_IDS)], batch[key(kind, COMBINED_MASK)], batch[key(kind, LABELS)])

    @classmethod
    def stacked(cls, batch: Dict, kinds: Sequence[str], pad_token_id: int, device=None) -> 'Sequences':
        """The rows of every kind, one kind after the other, padded to one length (on `device`)."""
        parts = [cls.of(batch, kind) for kind in kinds]
        length = max(part.input_ids.shape[1] for part in parts)
        stack = lambda name, pad: torch.cat([pad_to_length(getattr(part, name), length, pad) for part in parts]).to(device)
        return cls(stack('input_ids', pad_token_id), stack('attention_mask', 0), stack('labels', IGNORE_INDEX))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> 'Sequences':
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def reordered(self, order: torch.Tensor) -> 'Sequences':
        return Sequences(self.input_ids[order], self.attention_mask[order], self.labels[order])


def rows_per_kind(batch: Dict, kinds: Sequence[str]) -> List[int]:
    return [batch[key(kind, COMBINED_IDS)].shape[0] for kind in kinds]


@dataclass(frozen=True)
class LabelledCompletions:
    """Every completion of a batch with its label: an unpaired batch's targets, or each pair's chosen then
    rejected completion (in data order: c0, r0, c1, r1, ..., so that the rows of all ranks gathered are the
    rows of one process)."""
    sequences: Sequences
    is_desirable: torch.Tensor   # [rows] bool
    prompts: List                # [rows] each row's prompt as its record gave it (a string or turns)
    completions: List[str]       # [rows] each row's completion string
    weights: torch.Tensor        # [rows] (a pair's weight for both its rows)

    @classmethod
    def of(cls, batch: Dict, pad_token_id: int, device=None) -> 'LabelledCompletions':
        if CHOSEN in kinds(batch):
            n = batch_size(batch)
            order = torch.arange(2 * n).view(2, n).t().flatten()  # [c0, r0, c1, r1, ...] of [c0, c1, ..., r0, r1, ...]
            completions = batch[key(CHOSEN, TEXT)] + batch[key(REJECTED, TEXT)]
            is_desirable = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
            sequences = Sequences.stacked(batch, (CHOSEN, REJECTED), pad_token_id, device).reordered(order.to(device))
            return cls(sequences, is_desirable[order].to(device), [batch[PROMPT_AS_GIVEN][i // 2] for i in range(2 * n)],
                       [completions[i] for i in order.tolist()], batch[WEIGHT].repeat(2)[order].to(device))
        return cls(Sequences.stacked(batch, (TARGET,), pad_token_id, device), batch[IS_DESIRABLE].to(device),
                   list(batch[PROMPT_AS_GIVEN]), list(batch[key(TARGET, TEXT)]), batch[WEIGHT].to(device))
