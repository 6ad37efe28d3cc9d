"""Data: the HALOs data model, the dataset functions and the batch loaders.

A dataset function `get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
data_dir=None)` returns a `Dataset`: an ordered mapping from the formatted prompt to an `Example` that holds
all completions of that prompt, their pairwise preferences and/or unary labels. Register a new one in
`DATASETS` (`dataloader.DATASETS['foo'] = get_foo`). The hub parsers live in halos/datasets.py and feedback
files in halos/feedback.py; both are importable from here.

Loaders flatten the Examples into training items (one per prompt for SFT, one per pair for DPO-style
losses, one per desirable or undesirable completion for KTO-style losses), shuffle them with a seeded RNG,
tokenize lazily and yield padded batches (the keys: halos/batch.py). The shared machinery is
halos.batching.DataLoader; each loader below says only how Examples become items and items become elements.
"""
import random
from dataclasses import dataclass
from typing import Dict, List, NamedTuple

from halos import batch as schema
from halos.batching import Cuts, DataLoader, PairItem, ScoredItem, json_digest, repeats_to_divide
from halos.datasets import (DATASETS, get_alpacaeval, get_hh, get_hh_harmless, get_hh_helpful, get_oasst,
                            get_shp, get_ultrabin, load_dataset, load_raw_records)
from halos.errors import ConfigError, DataError
from halos.examples import Dataset, Example, render_turns
from halos.feedback import get_feedback_file, read_json_records
from halos.settings import Rule, setting
from utils import find_class, rank0_print

__all__ = ['DATASETS', 'DataError', 'Dataset', 'Example', 'get_alpacaeval', 'get_feedback_file', 'get_hh',
           'get_hh_harmless', 'get_hh_helpful', 'get_oasst', 'get_shp', 'get_ultrabin', 'load_dataset',
           'load_raw_records', 'read_json_records', 'render_turns', 'DataLoader', 'SFTDataLoader',
           'UnpairedPreferenceDataLoader', 'SimpleKTODataLoader', 'ConditionalSFTDataLoader',
           'PairedPreferenceDataLoader', 'GroupUnpairedPreferenceDataLoader', 'PromptDataLoader', 'get_dataloader_class']


class SFTDataLoader(DataLoader):
    """One item per SFT target: a prompt's generations[sft_index], or each of its demonstrations (at most
    max_prompt_count). `prompt_suffix` is appended to every prompt (how a CSFT model is asked for desirable
    completions: its desirable control token)."""
    kinds = (schema.TARGET,)

    def __init__(self, *args, prompt_suffix: str = '', **kwargs):
        self.prompt_suffix = prompt_suffix
        super().__init__(*args, **kwargs)

    def flatten(self, examples):
        undesirable_only = sum(bool(example.desirable) and True not in example.desirable for example in examples)
        if undesirable_only and self.split == 'train':
            rank0_print(f"warning: [train] {undesirable_only} of the {len(examples)} prompts have only outputs labelled "
                        f"undesirable, and SFT's target there is one of them (the best-rewarded, else the first; as "
                        f"in HALOs): leave them out of the data to imitate desirable outputs alone")
        return [(example, target) for example in examples
                for target in example.sft_targets()[:self.max_prompt_count]]  # eval.py samples each prompt once

    def tokenize_items(self, items, global_batch):
        elements = []
        for example, completion in items:
            prompt = self.prompt_text(example) + self.prompt_suffix
            element = self.tokenize_element(example, prompt, {schema.TARGET: completion})
            element.update({schema.ORIGINAL_PROMPT: example.original_prompt, schema.WEIGHT: example.weight_of(completion)})
            elements.append(element)
        return elements


class UnpairedPreferenceDataLoader(DataLoader):
    """One item per desirable or undesirable completion (a pair's chosen and rejected are one of each).

    When the trainer reads them (KTO), each element also carries a mismatched 'KL' completion: in the
    global batch, item i's prompt is paired with item (i+1 mod B)'s completion. KTO estimates its reference
    point from these.
    """
    feedback_kinds = ('binary', 'pairwise')
    kinds, labels = (schema.TARGET, schema.KL), (schema.IS_DESIRABLE,)

    def flatten(self, examples):
        return self.unary_items(examples)

    def tokenize_items(self, items, global_batch):
        start = self.rank * len(items)
        elements = []
        for offset, item in enumerate(items):
            prompt = self.prompt_text(item.example)
            element = self.tokenize_element(item.example, prompt, {schema.TARGET: item.completion})
            if schema.KL in self.sequence_kinds:
                mismatched = global_batch[(start + offset + 1) % len(global_batch)].completion
                kl = self.tokenize_element(item.example, prompt, {schema.KL: mismatched})
                element.update({key: value for key, value in kl.items() if key.startswith(f'{schema.KL}_')})
            element.update({schema.IS_DESIRABLE: item.is_desirable, schema.WEIGHT: item.weight})
            elements.append(element)
        return elements


class SimpleKTODataLoader(UnpairedPreferenceDataLoader):
    """Unpaired items in batches of exactly B/2 desirable and B/2 undesirable, alternating."""

    @classmethod
    def check_batch_size(cls, batch_size: int, world_size: int) -> None:
        if (batch_size // world_size) % 2:
            raise ConfigError(f"SimpleKTODataLoader needs an even number of examples per process, got batch_size "
                              f"{batch_size} over {world_size} processes")

    def flatten(self, examples):
        items = super().flatten(examples)
        desirable = sum(item.is_desirable for item in items)
        half = self.batch_size // 2
        if items and min(desirable, len(items) - desirable) < half:
            raise DataError(f"{', '.join(self.dataset_names)}: SimpleKTODataLoader fills each batch with {half} "
                            f"desirable and {half} undesirable examples, and the {self.split} split holds {desirable} "
                            f"desirable and {len(items) - desirable} undesirable ones")
        return items

    def epoch_batches(self, rng):
        order = list(self.items)
        rng.shuffle(order)
        desirable = [item for item in order if item.is_desirable]
        undesirable = [item for item in order if not item.is_desirable]
        half = self.batch_size // 2
        batches = []
        for start in range(0, min(len(desirable), len(undesirable)) - half + 1, half):
            batches.append([item for pair in zip(desirable[start:start + half], undesirable[start:start + half])
                            for item in pair])
        return batches


class ConditionalSFTDataLoader(UnpairedPreferenceDataLoader):
    """SFT on desirable and undesirable completions, the prompt ending in a control token (CSFT).

    The control token belongs to the prompt, so it is masked out of the loss.
    """
    kinds = (schema.TARGET,)

    @dataclass(frozen=True)
    class Params:
        chosen_control_token: str = setting('<|good|>', 'ends the prompt of a desirable completion (and asks for one)',
                                            Rule(bool, 'a non-empty string', names_values=True))
        rejected_control_token: str = setting('<|bad|>', 'ends the prompt of an undesirable completion',
                                              Rule(bool, 'a non-empty string', names_values=True))

        def __post_init__(self):
            if self.chosen_control_token == self.rejected_control_token:
                raise ConfigError(f"loss.chosen_control_token and loss.rejected_control_token are both "
                                  f"{self.chosen_control_token!r}: CSFT conditions on which one ends the prompt")

    def __init__(self, *args, chosen_control_token: str = '<|good|>', rejected_control_token: str = '<|bad|>',
                 **kwargs):
        self.chosen_control_token, self.rejected_control_token = chosen_control_token, rejected_control_token
        super().__init__(*args, **kwargs)

    @classmethod
    def control_tokens(cls, params) -> List[str]:
        return [params.chosen_control_token, params.rejected_control_token]

    def flatten(self, examples):
        """The items, once no prompt or completion holds a control token's text: as a special token it would cut
        that text apart, and a prompt would seem to ask for one kind of completion."""
        items = super().flatten(examples)
        for token in (self.chosen_control_token, self.rejected_control_token):
            found = [item for item in items if token in item.example.prompt or token in item.completion]
            if found:
                where = found[0].example.source or found[0].example.dataset_name
                more = f" (as do {len(found) - 1} more of the {self.split} split's {len(items)} items)" \
                    if len(found) > 1 else ''
                raise DataError(f"{where}: the text holds {token!r}, a CSFT control token{more}: choose a token that "
                                f"occurs nowhere in the data (the default <|good|> and <|bad|>)")
        return items

    def tokenize_items(self, items, global_batch):
        elements = []
        for item in items:
            token = self.chosen_control_token if item.is_desirable else self.rejected_control_token
            element = self.tokenize_element(item.example, self.prompt_text(item.example) + token,
                                            {schema.TARGET: item.completion})
            element.update({schema.IS_DESIRABLE: item.is_desirable, schema.WEIGHT: item.weight})
            elements.append(element)
        return elements


class PairedPreferenceDataLoader(DataLoader):
    """One item per preference pair (chosen, rejected); both share the same prompt tokens."""
    feedback_kinds = ('pairwise',)
    kinds = (schema.CHOSEN, schema.REJECTED)

    def flatten(self, examples):
        rng = random.Random(self.seed)
        items = []
        for example in examples:
            pairs = self.example_pairs(example, rng)
            if not pairs:
                self.counts['prompts without pairs'] += 1
            items += [PairItem(example, example.generations[i], example.generations[j], example.pair_weight((i, j)))
                      for i, j in pairs]
        return items

    def tokenize_items(self, items, global_batch):
        return [{**self.tokenize_element(item.example, self.prompt_text(item.example),
                                         {schema.CHOSEN: item.chosen, schema.REJECTED: item.rejected}),
                 schema.WEIGHT: item.weight} for item in items]


class GroupUnpairedPreferenceDataLoader(DataLoader):
    """Scored completions grouped by prompt (GRPO): every global batch holds whole groups, so a group's
    statistics are those of all its completions (a group larger than batch_size is shuffled and cut into
    parts of batch_size, each then a group, and counted). The score is the data's reward, else +1 for a
    desirable and -1 for an undesirable completion (HALOs). A batch holds at most batch_size completions, split as
    evenly as possible across processes."""
    feedback_kinds = ('binary', 'pairwise', 'scalar')
    kinds, labels = (schema.TARGET,), (schema.SCORE, schema.PROMPT_ID)

    def flatten(self, examples):
        rng = random.Random(self.seed)
        items, largest = [], 0
        for example in examples:
            if example.scores and all(score is not None for score in example.scores):
                scored = zip(example.generations, example.scores)
            else:
                scored = [(text, 1.0 if is_desirable else -1.0) for text, is_desirable in self.unary_labels(example, rng)]
            scored = [ScoredItem(example, completion, float(score), example.weight_of(completion))
                      for completion, score in scored]
            self.counts['groups larger than batch_size, cut into parts'] += len(scored) > self.batch_size
            items += scored
            largest = max(largest, len(scored))
        cut = self.counts['groups larger than batch_size, cut into parts']
        if self.split == 'train' and cut:
            rank0_print(f"warning: {cut} of {len(examples)} prompts have more completions than model.batch_size="
                        f"{self.batch_size}: each is cut into parts of at most {self.batch_size}, and each part is a "
                        f"group of its own (its own mean and std); model.batch_size={largest} keeps every group whole")
        group_scores: Dict[str, set] = {}
        for item in items:
            group_scores.setdefault(item.example.group_key(), set()).add(item.score)
        if self.split == 'train' and items and all(len(scores) == 1 for scores in group_scores.values()):
            raise DataError(f"{', '.join(self.dataset_names)}: all completions of each prompt share one score "
                            f"({len(group_scores)} prompts), so every advantage would be 0 and training would learn "
                            f"nothing; a prompt needs completions with different rewards (or desirable and "
                            f"undesirable ones)")
        return items

    def epoch_batches(self, rng):
        groups: Dict[str, List[ScoredItem]] = {}
        for item in self.items:
            groups.setdefault(item.example.group_key(), []).append(item)
        order = list(groups.values())
        rng.shuffle(order)
        batches, current = [], []
        for group in order:
            if len(group) > self.batch_size:  # parts that each fill a batch (and are each a group), shuffled so
                group = rng.sample(group, len(group))  # that a file sorted by score does not give tied parts
                parts = [group[start:start + self.batch_size] for start in range(0, len(group), self.batch_size)]
            else:
                parts = [group]
            for part in parts:
                if len(current) + len(part) > self.batch_size:
                    batches.append(current)
                    current = []
                current += part
        return batches + [current] if current else batches

    def local_items(self, global_batch):
        bounds = [round(rank * len(global_batch) / self.world_size) for rank in range(self.world_size + 1)]
        return global_batch[bounds[self.rank]:bounds[self.rank + 1]]

    def tokenize_items(self, items, global_batch):
        elements = []
        for item in items:
            element = self.tokenize_element(item.example, self.prompt_text(item.example), {schema.TARGET: item.completion})
            element.update({schema.SCORE: item.score, schema.PROMPT_ID: item.example.group_key(),
                            schema.WEIGHT: item.weight})
            elements.append(element)
        return elements


class RepeatedPrompt(NamedTuple):
    """A prompt that fills a batch up to a multiple of the processes (sampling keeps no sample of it)."""
    example: Example


class PromptDataLoader(DataLoader):
    """One item per prompt, with no completion: what sampling needs (eval.py's k samples per prompt, online
    rounds, online PPO). Prompts come from any dataset or from a prompts file ({"prompt": ...} records).
    `prompt_suffix` is appended to every prompt (a CSFT policy's desirable control token).

    Every prompt is sampled: a last batch that does not divide among the processes is filled up with repeats
    of its own prompts, marked schema.REPEATED (sample_records keeps none of their samples; a step-level run
    trains on them, as torch's DistributedSampler pads)."""
    kinds = ()

    def __init__(self, *args, prompt_suffix: str = '', **kwargs):
        self.prompt_suffix = prompt_suffix
        super().__init__(*args, **kwargs)

    def divisible(self, last, n_items):
        return last + [RepeatedPrompt(example) for example in repeats_to_divide(last, self.world_size)]

    def flatten(self, examples):
        return list(examples)

    def cuts(self, limit: int = 64) -> Cuts:
        """Of the first `limit` prompts, how many tokenize_prompt cuts to max_prompt_length (with no completion
        to fit after it, every longer one is cut)."""
        examples = list(self.full_data.values())[:limit]
        cut = sum(len(self.encode_prompt(self.prompt_text(example) + self.prompt_suffix)) > self.max_prompt_length
                  for example in examples)
        return Cuts(0, 0, cut, len(examples))

    def fields_digest(self) -> str:
        """A digest of the prompts' own fields, in the items' order: what a reward function is given beside each
        prompt (an answer), which a resumed run must find as its checkpoint did."""
        return json_digest([example.extra for example in self.items])

    def tokenize_items(self, items, global_batch):
        elements = []
        for item in items:
            example = item.example if isinstance(item, RepeatedPrompt) else item
            element = self.tokenize_prompt(example, self.prompt_text(example) + self.prompt_suffix)
            element.update({schema.PROMPT_ID: example.group_key(), schema.PROMPT_TURNS: example.turns,
                            schema.PROMPT_AS_GIVEN: example.given_prompt(), schema.PROMPT_EXTRA: example.extra,
                            schema.DATASET: example.dataset_name, schema.REPEATED: isinstance(item, RepeatedPrompt)})
            elements.append(element)
        return elements


def get_dataloader_class(name: str) -> type:
    """The loader class called `name` in this module (so a loader added here is found by its YAML)."""
    return find_class(globals(), DataLoader, name, 'loss.dataloader', 'a dataloader')
