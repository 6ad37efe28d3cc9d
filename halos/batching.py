"""The loader machinery every loader of dataloader.py shares: loading the named datasets, the epoch plan,
sharding a global batch across processes, and tokenizing one prompt with its completions.

A subclass says how Examples become items (`flatten`) and how a batch of items becomes tokenized
elements (`tokenize_items`), and may declare the special tokens it adds to prompts (`control_tokens`).
"""
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from halos import batch as schema
from halos.datasets import load_dataset
from halos.errors import ConfigError, DataError
from halos.examples import Example, chat_template_prompt
from halos.feedback import NoRecordsForSplit
from utils import rank0_print


class UnaryItem(NamedTuple):
    """A completion labelled desirable or undesirable."""
    example: Example
    completion: str
    is_desirable: bool
    weight: float = 1.0


class PairItem(NamedTuple):
    example: Example
    chosen: str
    rejected: str
    weight: float = 1.0


class Cuts(NamedTuple):
    """How many of the completions, and of the prompts, that were checked max_length and max_prompt_length cut."""
    completions_cut: int
    completions: int
    prompts_cut: int
    prompts: int


class ScoredItem(NamedTuple):
    """A completion with its score, in the group of its prompt."""
    example: Example
    completion: str
    score: float
    weight: float = 1.0


def encode_prompt(tokenizer, text: str, use_chat_template: bool) -> List[int]:
    """Prompt tokens with at most one BOS (the tokenizer's, if it adds one) and no trailing EOS."""
    ids = tokenizer(text, add_special_tokens=not use_chat_template)['input_ids']
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def encode_completion(tokenizer, text: str) -> List[int]:
    """Completion tokens without special tokens, ending in one EOS."""
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and ids and ids[0] == bos and bos != eos:
        ids = ids[1:]
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids + [eos]


FEEDBACK_NAMES = {'binary': 'binary feedback (desirable and undesirable outputs)', 'pairwise': 'preference pairs',
                  'scalar': 'scored outputs without labels', 'demonstration': 'demonstrations (outputs without a label '
                                                                                'or a score)'}


def item_example(item) -> Example:
    """The Example an item of a loader comes from (a prompt loader's items are Examples)."""
    return item if isinstance(item, Example) else item[0]


def held_feedback_kinds(examples: Iterable[Example]) -> List[str]:
    """The kinds of feedback the examples hold: pairwise (pairs), binary (labels), scalar (scores alone),
    demonstration (outputs alone)."""
    held = set()
    for example in examples:
        scored = example.scores and not (example.pairs or example.desirable or example.demonstrated)
        held.update(kind for kind, has in (('pairwise', example.pairs), ('binary', example.desirable),
                                           ('scalar', scored), ('demonstration', example.demonstrated)) if has)
    return sorted(held)


def load_examples(dataset_names: Sequence[str], split: str, formatting: Tuple[str, str, str, str],
                  data_dir: Optional[str], seed: int) -> Tuple[Dict[str, Example], Counter]:
    """The Examples of every named dataset, with counts. A later dataset's prompt replaces an earlier one's (as in
    HALOs), which is warned of: feedback on one prompt split over two files trains on the later file's alone. A
    file with no records of this split is warned of where the others give some."""
    examples: Dict[str, Example] = {}
    counts: Counter = Counter()
    lacking_split: List[NoRecordsForSplit] = []
    for index, name in enumerate(dataset_names):
        if name in dataset_names[:index]:
            rank0_print(f"warning: [{split}] datasets names {name} twice: it is read once")
            continue
        try:
            dataset = load_dataset(name, split, *formatting, data_dir=data_dir, seed=seed)
        except NoRecordsForSplit as error:
            lacking_split.append(error)
            continue
        overlap = sum(key in examples for key in dataset)
        counts[f'{name}: prompts'] += len(dataset)
        counts.update({f'{name}: {what}': n for what, n in dataset.counts.items()})
        if overlap:
            counts[f'{name}: prompts that replaced an earlier dataset\'s prompt'] += overlap
            rank0_print(f"warning: [{split}] {overlap} of the {len(dataset)} prompts of {name} are also prompts of "
                        f"{', '.join(dataset_names[:index])}, whose examples of them it replaces (as in HALOs): "
                        f"give feedback on one prompt in one file to train on all of it")
        examples.update(dataset.data)
    if lacking_split and not examples:
        raise lacking_split[0]
    for error in lacking_split:
        rank0_print(f"warning: [{split}] {error}: it adds nothing to this split, which the other datasets give")
    return examples, counts


def json_digest(values: Iterable) -> str:
    """A short digest of values, each as JSON, in their order."""
    hashed = hashlib.sha256()
    for value in values:
        hashed.update(json.dumps(value, default=str).encode())
    return hashed.hexdigest()[:16]


def repeats_to_divide(batch: List, world_size: int) -> List:
    """The batch's own items, in turn, that fill it up to a multiple of world_size."""
    return (batch * world_size)[:-len(batch) % world_size]


class DataLoader:
    """Base loader: flattening into items is up to the subclass; batching, tokenization and sharding live here.

    Each global batch holds `batch_size` items; this process (rank r of world_size W) tokenizes and
    yields only its contiguous slice of B/W items, so all ranks together see the global batch.
    `sequence_kinds` are the sequences the trainer reads (its `prefixes`); a loader leaves out the
    others (e.g. KTO's mismatched KL rows for trainers that never read them). None: every kind it has.
    """
    feedback_kinds: Optional[Tuple[str, ...]] = None  # binary, pairwise, scalar: what its items come from (None: any)
    kinds: Optional[Tuple[str, ...]] = None  # the sequence kinds its batches hold, which a trainer's prefixes must be
                                             # among (None: not declared, not checked; () prompts alone)
    labels: Tuple[str, ...] = ()  # the label fields its batches hold (a trainer's labels_read must be among them)

    def __init__(self, dataset_names: List[str], tokenizer, split: str = 'train', batch_size: int = 1,
                 max_length: int = 512, max_prompt_length: int = 128, max_prompt_count: Optional[int] = None,
                 n_epochs: Optional[int] = None, n_examples: Optional[int] = None,
                 human_prefix: str = '\n<|user|>\n', human_suffix: str = '',
                 assistant_prefix: str = '\n<|assistant|>\n', assistant_suffix: str = '',
                 seed: int = 0, data_dir: Optional[str] = None, use_chat_template: bool = False,
                 frac_unique_desirable: float = 1.0, frac_unique_undesirable: float = 1.0,
                 sequence_kinds: Optional[Sequence[str]] = None, rank: int = 0, world_size: int = 1):
        if n_epochs is None and n_examples is None:
            raise ConfigError("set n_epochs or n_examples (both are null)")
        if max_prompt_length >= max_length:
            raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}), "
                              f"or no room is left for a completion")
        if batch_size % world_size != 0:
            key = 'model.batch_size' if split == 'train' else 'model.eval_batch_size'
            raise ConfigError(f"{key} ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.check_batch_size(batch_size, world_size)  # before the data loads (and a fresh run clears its directory)
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.dataset_names = list(dataset_names)
        self.split, self.batch_size = split, batch_size
        self.max_length, self.max_prompt_length, self.max_prompt_count = max_length, max_prompt_length, max_prompt_count
        self.n_epochs, self.n_examples = n_epochs, n_examples
        self.seed, self.use_chat_template = seed, use_chat_template
        self.frac_unique_desirable, self.frac_unique_undesirable = frac_unique_desirable, frac_unique_undesirable
        self.sequence_kinds = tuple(sequence_kinds) if sequence_kinds is not None else schema.KINDS
        self.rank, self.world_size = rank, world_size
        self.warned_of_left_out = False
        self.skip_batches = 0  # set when resuming: the first batches are planned but not tokenized

        formatting = (human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        self.full_data, self.counts = load_examples(dataset_names, split, formatting, data_dir, seed)
        prompts = list(self.full_data)
        random.Random(seed).shuffle(prompts)  # a frac_unique_* subset is a random, fixed part of the data
        self.items = self.flatten([self.full_data[p] for p in prompts])
        self.counts['items'] = len(self.items)
        rank0_print(f"[{split}] {type(self).__name__}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))
        if split == 'train' and self.items and not any(getattr(item, 'weight', 1.0) > 0 for item in self.items):
            raise DataError(f"{', '.join(self.dataset_names)}: every one of the {len(self.items)} items has weight 0, "
                            f"so there is nothing to train on")

    @dataclass(frozen=True)
    class Params:
        """Keys of the loss section this loader reads (config/loss/<name>.yaml), passed to its constructor."""

    # --- what subclasses provide
    @classmethod
    def check_batch_size(cls, batch_size: int, world_size: int) -> None:
        """Stop on a batch size this loader cannot cut its batches from (ConfigError)."""

    @classmethod
    def control_tokens(cls, params) -> List[str]:
        """Special tokens this loader adds to prompts (the tokenizer and embeddings must know them)."""
        return []

    def flatten(self, examples: List[Example]) -> List[Tuple]:
        raise NotImplementedError

    def tokenize_items(self, items: List[Tuple], global_batch: List[Tuple]) -> List[Dict]:
        raise NotImplementedError

    # --- shared pairs and labels
    def example_pairs(self, example: Example, rng: random.Random) -> List[Tuple[int, int]]:
        if self.max_prompt_count is not None and len(example.pairs) > self.max_prompt_count:
            return rng.sample(example.pairs, self.max_prompt_count)
        return example.pairs

    def unary_items(self, examples: List[Example]) -> List[UnaryItem]:
        """One item per distinct completion of a prompt, desirable or undesirable.

        A completion's label is the sign of (pairs it wins - pairs it loses), or its binary label;
        a completion with as many wins as losses (e.g. the middle of an OASST ranking a > b > c), or
        labelled both ways, gets no label and is counted as dropped. The first frac_unique_* of each
        kind (in shuffled prompt order) is kept.
        """
        rng = random.Random(self.seed)
        desirable, undesirable = [], []
        for example in examples:
            for text, is_desirable in self.unary_labels(example, rng):
                (desirable if is_desirable else undesirable).append(
                    UnaryItem(example, text, is_desirable, example.weight_of(text)))
        n_desirable = round(len(desirable) * self.frac_unique_desirable)
        n_undesirable = round(len(undesirable) * self.frac_unique_undesirable)
        self.counts['unary: desirable'], self.counts['unary: undesirable'] = n_desirable, n_undesirable
        self.counts['unary: dropped by frac_unique_*'] = len(desirable) + len(undesirable) - n_desirable - n_undesirable
        for kind, found, kept, share in (('desirable', desirable, n_desirable, self.frac_unique_desirable),
                                         ('undesirable', undesirable, n_undesirable, self.frac_unique_undesirable)):
            if self.split != 'train' or kept or not (desirable or undesirable):
                continue
            why = f"frac_unique_{kind}={share} keeps none of the {len(found)} {kind} examples" if found else \
                f"the training data ({', '.join(self.dataset_names)}) holds no {kind} examples"
            also = ", and evaluation too (frac_unique_* thins the test split alike, as in HALOs)" if found else ''
            rank0_print(f"warning: {why}: the loss sees only the other kind{also}")
        return desirable[:n_desirable] + undesirable[:n_undesirable]

    def unary_labels(self, example: Example, rng: random.Random) -> List[Tuple[str, bool]]:
        """(completion, is_desirable) of each distinct completion of a prompt that gets a label (see unary_items)."""
        net = Counter()
        for i, j in self.example_pairs(example, rng):
            net[example.generations[i]] += 1
            net[example.generations[j]] -= 1
        for text, label in zip(example.generations, example.desirable):
            net[text] += 1 if label else -1
            self.counts['binary labels'] += 1
        self.counts['unary: dropped, as often preferred as dispreferred'] += sum(score == 0 for score in net.values())
        return [(text, score > 0) for text, score in net.items() if score != 0]

    # --- batching
    def epoch_batches(self, rng: random.Random) -> List[List[Tuple]]:
        """One epoch of global batches: the items shuffled, cut into batch_size chunks, the last one kept and made
        to divide among the processes (`divisible`)."""
        order = list(self.items)
        rng.shuffle(order)
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if batches and len(batches[-1]) % self.world_size:
            batches[-1] = self.divisible(batches[-1], len(order))
            if not batches[-1]:
                batches.pop()
        return batches

    def divisible(self, last: List, n_items: int) -> List:
        """An epoch's last batch made to divide among the processes: trimmed, the items it leaves out warned of (a
        different one each epoch, as the order is shuffled); where the epoch holds fewer items than processes (an
        online round that gave one pair), filled up with repeats instead, as torch's DistributedSampler pads, so
        that each process has one."""
        if n_items < self.world_size:
            self.warn_once(f"warning: [{self.split}] {', '.join(self.dataset_names)} gives {n_items} of what "
                           f"{type(self).__name__} iterates, fewer than the {self.world_size} processes: repeated so "
                           f"that each process has one")
            return last + repeats_to_divide(last, self.world_size)
        keep = len(last) - len(last) % self.world_size
        self.warn_once(f"warning: [{self.split}] the last batch of each epoch leaves out {len(last) - keep} of "
                       f"{n_items} items so that it divides among the {self.world_size} processes (another one "
                       f"each epoch: the order is shuffled)")
        return last[:keep]

    def warn_once(self, message: str) -> None:
        """How an epoch's last batch was made to divide, said at the first epoch (every epoch's is alike)."""
        if not self.warned_of_left_out:
            self.warned_of_left_out = True
            rank0_print(message)

    def plan(self) -> Iterator[List[Tuple]]:
        """The global batches of the whole run, untokenized: epochs until n_epochs or n_examples."""
        rng = random.Random(self.seed + 1)
        epoch, n_seen = 0, 0
        while self.n_epochs is None or epoch < self.n_epochs:
            batches = self.epoch_batches(rng)
            if not batches:
                raise DataError(self.why_no_items())
            for batch in batches:
                if self.n_examples is not None and n_seen >= self.n_examples:
                    return  # n_examples=0: no batch (n_eval_examples=0 skips evaluation)
                yield batch
                n_seen += len(batch)
            epoch += 1

    def why_no_items(self, losses_reading: Callable[[str], List[str]] = lambda kind: []) -> str:
        """Why the data gives this loader no item; `losses_reading(kind)` names the losses that train on a kind of
        feedback."""
        names = ', '.join(self.dataset_names)
        if self.full_data and not any(example.generations for example in self.full_data.values()):
            return (f"{names}: {len(self.full_data)} prompts and no completions to train on: sample and label "
                    f"them first (eval.py ++mode=sample ++num_samples_per_prompt=k, then label.py), or train online "
                    f"on them (++online.rounds=N, or loss=grpo-online)")
        counts = ', '.join(f'{k} {v}' for k, v in sorted(self.counts.items()))
        held = held_feedback_kinds(self.full_data.values())
        if self.feedback_kinds and held and not set(held) & set(self.feedback_kinds):
            named = {kind: losses_reading(kind) for kind in held}
            losses = '; '.join(f"{kind}: {', '.join(names)}" for kind, names in named.items() if names)
            return (f"{names}: {' and '.join(FEEDBACK_NAMES[kind] for kind in held)}, and {type(self).__name__} "
                    f"(loss.dataloader) trains on {' or '.join(FEEDBACK_NAMES[k] for k in self.feedback_kinds)}: "
                    f"choose a loss for this feedback{f' ({losses})' if losses else ''}, or label the samples as "
                    f"{self.feedback_kinds[0]} feedback (label.py --feedback {self.feedback_kinds[0]}) ({counts})")
        return f"[{self.split}] {names}: no {type(self).__name__} items to iterate ({counts})"

    def digest(self) -> str:
        """A digest of the items, in their order: what a checkpoint's data position counts batches of."""
        return json_digest([item.prompt] if isinstance(item, Example) else [item[0].prompt, *item[1:]]
                           for item in self.items)

    def examples_per_epoch(self) -> int:
        """The training examples of one epoch (every epoch holds as many: only their order changes)."""
        return sum(map(len, self.epoch_batches(random.Random(self.seed))))

    def __len__(self) -> int:
        return sum(1 for _ in self.plan())

    def __iter__(self) -> Iterator[Dict]:
        for index, global_batch in enumerate(self.plan()):
            if index < self.skip_batches:
                continue
            yield schema.collate(self.tokenize_items(self.local_items(global_batch), global_batch),
                                 self.tokenizer.pad_token_id)

    def batch_of(self, items: List[Tuple]) -> Dict:
        """A batch of the given items (this process's own, not a slice of a global batch)."""
        return schema.collate(self.tokenize_items(items, items), self.tokenizer.pad_token_id)

    def local_items(self, global_batch: List[Tuple]) -> List[Tuple]:
        """This process's contiguous slice of a global batch (batches hold a multiple of world_size items)."""
        local_size = len(global_batch) // self.world_size
        return global_batch[self.rank * local_size:(self.rank + 1) * local_size]

    # --- tokenization
    def prompt_text(self, example: Example) -> str:
        if self.use_chat_template:
            return chat_template_prompt(self.tokenizer, example.turns)
        return example.prompt

    def encode_prompt(self, text: str) -> List[int]:
        return encode_prompt(self.tokenizer, text, self.use_chat_template)

    def encode_completion(self, text: str) -> List[int]:
        return encode_completion(self.tokenizer, text)

    def tokenize_prompt(self, example: Example, prompt: str) -> Dict:
        """The prompt fields of a prompt alone (for sampling), cut to max_prompt_length (keeping its start or end)."""
        prompt_ids = self.encode_prompt(prompt)
        if len(prompt_ids) <= self.max_prompt_length:
            return schema.prompt_fields(prompt, prompt_ids)
        prompt_ids = self.cut_prompt(example, prompt_ids)
        self.counts['prompts truncated'] += 1
        return schema.prompt_fields(self.tokenizer.decode(prompt_ids, skip_special_tokens=False), prompt_ids)

    def cut_prompt(self, example: Example, prompt_ids: List[int]) -> List[int]:
        """The prompt's ids cut to max_prompt_length, keeping its start, or its end and its BOS."""
        keep = self.max_prompt_length
        if example.truncation_mode == 'keep_start':
            return prompt_ids[:keep]
        if example.truncation_mode == 'keep_end':
            has_bos = prompt_ids[0] == self.tokenizer.bos_token_id
            return prompt_ids[:1] * has_bos + prompt_ids[len(prompt_ids) - (keep - has_bos):]
        raise DataError(f"{example.source}: unknown truncation_mode '{example.truncation_mode}'")

    def prompt_is_cut(self, prompt_length: int, longest_completion: int) -> bool:
        """Whether an element's prompt is cut to max_prompt_length: where its longest completion would not fit."""
        return prompt_length + longest_completion > self.max_length and prompt_length > self.max_prompt_length

    def cuts(self, limit: int = 64) -> Cuts:
        """Of the first `limit` prompts that have completions, and of their completions, how many are cut (as
        tokenize_element cuts them: a prompt where its longest completion would not fit, then each completion)."""
        cut_completions = completions = cut_prompts = 0
        examples = [example for example in self.full_data.values() if example.generations][:limit]
        for example in examples:
            prompt = len(self.encode_prompt(self.prompt_text(example)))
            lengths = [len(self.encode_completion(text)) for text in example.generations]
            if self.prompt_is_cut(prompt, max(lengths)):
                prompt = self.max_prompt_length
                cut_prompts += 1
            cut_completions += sum(length > self.max_length - prompt for length in lengths)
            completions += len(lengths)
        return Cuts(cut_completions, completions, cut_prompts, len(examples))

    def tokenize_element(self, example: Example, prompt: str, completions: Dict[str, str]) -> Dict:
        """Tokenize one prompt with its completions (e.g. {'chosen': .., 'rejected': ..}).

        Each string is tokenized once and the token lists are concatenated, so the label mask is
        exactly the prompt's token count. Truncation is decided once for all completions of the
        element, so they share the same prompt tokens: if prompt + longest completion exceeds
        max_length and the prompt exceeds max_prompt_length, the prompt is cut to max_prompt_length
        (keeping its start or end, and its BOS); then each completion is cut to the room left. A cut
        completion loses its EOS: it did not end there. No sequence exceeds max_length.
        """
        prompt_ids = self.encode_prompt(prompt)
        completion_ids = {kind: self.encode_completion(text) for kind, text in completions.items()}
        longest = max(len(ids) for ids in completion_ids.values())
        prompt_truncated = self.prompt_is_cut(len(prompt_ids), longest)
        if prompt_truncated:
            prompt_ids = self.cut_prompt(example, prompt_ids)
        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"{example.source}: field 'prompt' is {len(prompt_ids)} tokens and leaves no room for "
                            f"a completion within max_length={self.max_length}; lower max_prompt_length")

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        prompt_text = decode(prompt_ids) if prompt_truncated else prompt
        element = {**schema.prompt_fields(prompt_text, prompt_ids), schema.PROMPT_TURNS: example.turns,
                   schema.PROMPT_AS_GIVEN: example.given_prompt(), 'truncation_mode': example.truncation_mode}
        for kind, ids in completion_ids.items():
            text = completions[kind]
            if len(ids) > room:
                ids = ids[:room]
                text = decode(ids)
                self.counts['completions truncated'] += 1
            element.update(schema.sequence_fields(kind, prompt_text, prompt_ids, text, ids))
        return element
