"""Data: exact counts and strings on the shipped samples, token-level guarantees, and bad input."""
import json
import os
import random

import pytest
import torch

import dataloader as D
from halos.batching import held_feedback_kinds
from halos.datasets import check_dataset_name
from helpers import DATA

FORMAT = dict(human_prefix='\n<|user|>\n', human_suffix='', assistant_prefix='\n<|assistant|>\n', assistant_suffix='')


def get(name, split):
    return D.load_dataset(name, split, **FORMAT, data_dir=DATA, seed=1)


def hub_copy(directory, name, rows):
    """Write `rows` as a local copy of hub dataset `name`'s train split; returns its reading, as train.py reads it."""
    os.makedirs(directory / name, exist_ok=True)
    (directory / name / 'train.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return lambda: D.load_dataset(name, 'train', **FORMAT, data_dir=str(directory), seed=1)


def loader(cls, names, tokenizer, split='train', **kwargs):
    options = dict(split=split, batch_size=4, max_length=256, max_prompt_length=128, n_epochs=1, data_dir=DATA, seed=1)
    options.update(kwargs)
    return cls(names, tokenizer, **options)


# name, split, prompts, pairs, desirable, undesirable
# Pairs follow the HALOs rules; unary labels are the sign of (wins - losses) per distinct completion:
#  - hh/train: 36 pairs, one a tie (record 7: chosen == rejected, one win and one loss: net 0, dropped) -> 35 / 35
#  - oasst/train: assistant replies only (3 ranked prompter replies dropped): 17 pairs in 10 prompts; each
#    ranking chain a > b > c keeps a and c and drops the middle: 7 middles -> 10 / 10
#  - pairwise feedback: 10 distinct outputs in 3 prompts, 2 of them win as often as they lose -> 4 / 4
COUNTS = [
    ('hh', 'train', 33, 36, 35, 35),
    ('hh', 'test', 11, 12, 11, 11),
    ('hh_helpful', 'train', 11, 12, 12, 12),
    ('hh_helpful', 'test', 6, 6, 5, 5),
    ('hh_harmless', 'train', 12, 12, 12, 12),
    ('hh_harmless', 'test', 6, 6, 6, 6),
    ('shp', 'test', 3, 12, 4, 4),
    ('oasst', 'train', 10, 17, 10, 10),
    ('oasst', 'test', 4, 6, 4, 4),
    ('ultrabin', 'train', 20, 20, 20, 20),
    ('ultrabin', 'test', 8, 8, 8, 8),
    (os.path.join(DATA, 'feedback', 'pairwise_feedback.jsonl'), 'train', 3, 8, 4, 4),
    (os.path.join(DATA, 'feedback', 'pairwise_feedback.jsonl'), 'test', 2, 4, 3, 4),
    (os.path.join(DATA, 'feedback', 'binary_feedback.json'), 'train', 4, 0, 4, 6),
    (os.path.join(DATA, 'feedback', 'binary_feedback.json'), 'test', 2, 0, 2, 3),
]


@pytest.mark.parametrize('name,split,prompts,pairs,desirable,undesirable', COUNTS)
def test_counts_per_dataset_and_loader(tokenizer, name, split, prompts, pairs, desirable, undesirable):
    dataset = get(name, split)
    assert len(dataset) == prompts and dataset.num_pairs() == pairs
    assert len(loader(D.SFTDataLoader, [name], tokenizer, split).items) == prompts
    if pairs:
        assert len(loader(D.PairedPreferenceDataLoader, [name], tokenizer, split).items) == pairs
    unpaired = loader(D.UnpairedPreferenceDataLoader, [name], tokenizer, split)
    labels = [item.is_desirable for item in unpaired.items]
    assert labels.count(True) == desirable and labels.count(False) == undesirable


def test_shp_train_counts_follow_from_the_raw_rows_whatever_the_seed(tokenizer):
    """The 5-pair cap samples pairs with the seed, so the counts are derived from the raw rows (pairs) and
    from the sampled pairs themselves (unary labels: the sign of each distinct completion's wins - losses)."""
    import json
    from collections import Counter
    with open(os.path.join(DATA, 'shp', 'train.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    kept = Counter(r['post_id'] for r in rows if max(r['score_A'] / r['score_B'], r['score_B'] / r['score_A']) >= 2)
    for seed in (1, 2, 3):
        unpaired = loader(D.UnpairedPreferenceDataLoader, ['shp'], tokenizer, seed=seed)
        examples = list(unpaired.full_data.values())
        assert len(examples) == len(kept)
        assert sum(len(e.pairs) for e in examples) == sum(min(5, n) for n in kept.values()) == 27
        desirable = undesirable = 0
        for example in examples:
            net = Counter()
            for i, j in example.pairs:
                net[example.generations[i]] += 1
                net[example.generations[j]] -= 1
            desirable += sum(score > 0 for score in net.values())
            undesirable += sum(score < 0 for score in net.values())
        labels = [item.is_desirable for item in unpaired.items]
        assert (labels.count(True), labels.count(False)) == (desirable, undesirable)
        assert len(loader(D.PairedPreferenceDataLoader, ['shp'], tokenizer, seed=seed).items) == 27


def test_shp_filters_are_counted():
    train = get('shp', 'train')
    assert train.counts['records'] == 42
    assert train.counts['dropped: score ratio < 2'] == 12       # exactly 2.0 (lines 11 and 40) is kept
    assert train.counts['pairs dropped: more than 5 per prompt'] == 3   # posts of 7 and 6 pairs -> 5 each
    assert max(len(e.pairs) for e in train.data.values()) == 5
    test = get('shp', 'test')
    assert test.counts['dropped: score ratio < 2'] == 0 and test.num_pairs() == 12


def test_oasst_filters_and_sft_target():
    train = get('oasst', 'train')
    assert train.counts['dropped: not English'] == 11
    assert train.counts['dropped: ranked prompter reply'] == 3
    assert train.counts['dropped: no English sibling of the next better rank'] == 1
    assert train.counts['dropped: ancestor not English or missing'] == 1
    for example in train.data.values():   # the SFT target is the best-ranked reply, not the last worse one
        assert example.scores[example.sft_index] == max(example.scores)  # a score is minus a rank
        assert example.prompt.startswith('\n<|user|>\n') and example.prompt.endswith('\n<|assistant|>\n')


def test_an_oasst_tree_whose_parents_loop_is_named_not_followed_for_ever(tmp_path):
    message = lambda id_, parent, role, rank: {'message_id': id_, 'parent_id': parent, 'role': role, 'text': id_,
                                                'lang': 'en', 'rank': rank}
    rows = [message('q', 'b', 'prompter', None), message('a', 'q', 'assistant', 0), message('b', 'q', 'assistant', 1)]
    with pytest.raises(D.DataError) as error:
        hub_copy(tmp_path, 'oasst', rows)()
    assert str(error.value) == (f"{tmp_path}/oasst/train.jsonl record 3: field 'parent_id' leads into a loop of "
                                f"messages ('q' is among its own ancestors), not up to a root message")


def test_hh_text_before_its_first_marker_is_dropped_and_counted_and_a_missing_marker_named(tmp_path):
    rows = [{'chosen': '\n\nHuman: hi\n\nAssistant: hello', 'rejected': '\n\nHuman: hi\n\nAssistant: go'},
            {'chosen': 'Human: yo\n\nAssistant: hey', 'rejected': 'Human: yo\n\nAssistant: no'}]
    dataset = hub_copy(tmp_path, 'hh', rows)()
    assert dataset.counts["dropped: text before the first '\\n\\nHuman: '"] == 1
    assert [example.turns for example in dataset.data.values()] == [[{'role': 'user', 'content': 'hi'}]]
    rows[1] = {'chosen': '\n\nHuman: yo\n\nAssistant:hey', 'rejected': '\n\nHuman: yo\n\nAssistant:no'}
    with pytest.raises(D.DataError) as error:
        hub_copy(tmp_path, 'hh', rows)()
    assert str(error.value) == (f"{tmp_path}/hh/train.jsonl record 2: field 'chosen' has no '\\n\\nAssistant: ' "
                                f"marker (HH writes each turn as '\\n\\nHuman: ...' or '\\n\\nAssistant: ...')")


def test_ultrabin_replies_that_are_not_the_assistants_are_named_and_empty_ones_counted(tmp_path):
    turns = lambda reply, role='assistant': [{'role': 'user', 'content': 'Q?'}, {'role': role, 'content': reply}]
    rows = [{'prompt': 'Q?', 'chosen': turns('good'), 'rejected': turns('bad')},
            {'prompt': 'Q?', 'chosen': turns(''), 'rejected': turns('bad')}]
    dataset = hub_copy(tmp_path, 'ultrabin', rows)()
    assert dataset.counts['dropped: empty completion'] == 1
    assert [example.generations for example in dataset.data.values()] == [['good', 'bad']]
    rows.append({'prompt': 'Q?', 'chosen': turns('good'), 'rejected': turns('Q?', role='user')[:1]})
    with pytest.raises(D.DataError) as error:
        hub_copy(tmp_path, 'ultrabin', rows)()
    assert str(error.value) == (f"{tmp_path}/ultrabin/train.jsonl record 3: field 'rejected' ends with a user turn, "
                                f"not the assistant's reply")


def test_an_shp_label_other_than_0_or_1_is_named(tmp_path):
    row = {'history': 'Q?', 'human_ref_A': 'a', 'human_ref_B': 'b', 'score_A': 10, 'score_B': 2, 'labels': 2}
    with pytest.raises(D.DataError) as error:
        hub_copy(tmp_path, 'shp', [row])()
    assert str(error.value) == (f"{tmp_path}/shp/train.jsonl record 1: field 'labels' is 2; SHP's is 1 (human_ref_A "
                                f"preferred) or 0 (human_ref_B preferred)")


def test_exact_rendered_hh_strings():
    dataset = get('hh', 'train')
    prompt = ('\n<|user|>\nI need to write a short thank-you note to my neighbor.\n<|assistant|>\nHappy to help! '
              'What did your neighbor do for you?\n<|user|>\nShe watered my plants while I was away for two weeks.'
              '\n<|assistant|>\n')
    raw_key = prompt.replace('write a', 'write  a').replace('plants while', 'plants \t while')
    example = dataset[raw_key]
    assert example.prompt == prompt
    assert example.generations[example.sft_index] == (
        'Here\'s a short note: "Dear Maria, thank you so much for looking after my plants while I was away. '
        'They look wonderful, and I really appreciate your kindness!"')
    example = dataset['\n<|user|>\nCan you recommend a board game for a family with young kids?\n<|assistant|>\n']
    assert example.generations[0] == ('A cooperative game like Outfoxed is a great pick. The rules are simple, games '
                                      'are short, and the kids win or lose together with the grown-ups. ')


def test_exact_rendered_shp_strings():
    dataset = get('shp', 'train')
    example = dataset['\n<|user|>\nCan I substitute butter for oil in a muffin recipe? The recipe calls for half a '
                      'cup of vegetable oil and I only have butter.\n<|assistant|>\n']
    chosen = example.generations[example.pairs[0][0]]
    assert chosen == ('You can swap it one to one with melted butter. The muffins will taste richer but can be '
                      'slightly less moist, since butter is only about 80% fat and the rest is mostly water.')
    assert example.truncation_mode == 'keep_start'


def test_non_empty_suffixes_follow_each_turn():
    """HALOs put a suffix right after the prefix, before the turn; here it closes the turn."""
    dataset = D.load_dataset('hh', 'train', '<H>', '</H>', '<A>', '</A>', data_dir=DATA)
    example = dataset['<H>Can you recommend a board game for a family with young kids?</H><A>']
    assert example.generations[0].endswith('grown-ups. </A>')


# ---------------------------------------------------------------- tokens

def test_labels_mask_exactly_the_prompt_and_padding(tokenizer):
    paired = loader(D.PairedPreferenceDataLoader, ['hh'], tokenizer)
    for batch in paired:
        for side in ('chosen', 'rejected'):
            for ids, labels, mask, prompt in zip(batch[f'{side}_combined_input_ids'], batch[f'{side}_labels'],
                                                 batch[f'{side}_combined_attention_mask'], batch['prompt_input_ids']):
                n_prompt = int((prompt != tokenizer.pad_token_id).sum())  # prompts are left-padded
                n_real = int(mask.sum())
                assert (labels[:n_prompt] == -100).all() and (labels[n_real:] == -100).all()
                assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])
                assert n_real <= 256


def test_chosen_and_rejected_share_prompt_tokens_even_when_truncated(tokenizer):
    # max_length 200 forces hh record 10 (a ~500-token prompt, ~400-token reply) to be cut.
    paired = loader(D.PairedPreferenceDataLoader, ['hh'], tokenizer, max_length=200, max_prompt_length=100)
    seen_truncation = False
    for batch in paired:
        for c_ids, r_ids, c_labels, r_labels in zip(batch['chosen_combined_input_ids'], batch['rejected_combined_input_ids'],
                                                    batch['chosen_labels'], batch['rejected_labels']):
            n_c = int((c_labels == -100).logical_and(c_ids != tokenizer.pad_token_id).sum())  # prompt tokens
            prompt_c = c_ids[c_labels == -100][:n_c]
            prompt_r = r_ids[r_labels == -100][:n_c]
            assert torch.equal(prompt_c, prompt_r)
            assert (c_ids != tokenizer.pad_token_id).sum() <= 200
            seen_truncation |= n_c == 100
    assert seen_truncation and paired.counts['completions truncated'] > 0


def test_keep_end_keeps_the_last_prompt_tokens_and_a_cut_completion_has_no_eos(tokenizer):
    sft = loader(D.SFTDataLoader, ['hh'], tokenizer, max_length=120, max_prompt_length=60, batch_size=1)
    example = next(e for e in sft.full_data.values() if len(tokenizer(e.prompt)['input_ids']) > 400)
    element = sft.tokenize_element(example, example.prompt, {'target': example.generations[0]})
    full_prompt = tokenizer(example.prompt)['input_ids']
    assert element['prompt_input_ids'] == full_prompt[-60:]
    assert len(element['target_combined_input_ids']) == 120
    assert element['target_input_ids'][-1] != tokenizer.eos_token_id
    short = sft.tokenize_element(example, '\n<|user|>\nhi\n<|assistant|>\n', {'target': 'Hello!'})
    assert short['target_input_ids'][-1] == tokenizer.eos_token_id


def test_a_single_bos(tokenizer):
    from transformers import AutoTokenizer
    import models
    bos_tokenizer = AutoTokenizer.from_pretrained(models.embedded_model_dir('tiny-smollm2'), add_bos_token=True)
    sft = loader(D.SFTDataLoader, ['hh'], bos_tokenizer)
    bos = bos_tokenizer.bos_token_id
    example = next(iter(sft.full_data.values()))
    element = sft.tokenize_element(example, bos_tokenizer.bos_token + example.prompt,
                                   {'target': bos_tokenizer.bos_token + 'Sure.'})
    ids = element['target_combined_input_ids']
    assert ids[0] == bos and ids.count(bos) == 1
    element = sft.tokenize_element(example, example.prompt, {'target': 'Sure.'})
    assert element['target_combined_input_ids'].count(bos) == 1
    # a prompt cut for sampling keeps its BOS and its end, as a training prompt does
    long = next(e for e in sft.full_data.values() if len(bos_tokenizer(e.prompt)['input_ids']) > 200)
    sampled = sft.tokenize_prompt(long, long.prompt)['prompt_input_ids']
    trained = sft.tokenize_element(long, long.prompt, {'target': 'x' * 2000})['prompt_input_ids']
    assert sampled == trained and sampled[0] == bos and len(sampled) == sft.max_prompt_length


def test_sharding_splits_the_global_batch_and_kl_pairs_are_global(tokenizer):
    lengths = dict(max_length=2048, max_prompt_length=1024)   # no truncation: KL texts are whole completions
    whole = loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, batch_size=4, **lengths)
    ranks = [loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, batch_size=4, rank=r, world_size=2, **lengths)
             for r in (0, 1)]
    for global_batch, rank0, rank1 in zip(whole, *ranks):
        assert global_batch['target_text'] == rank0['target_text'] + rank1['target_text']
        assert global_batch['KL_text'] == rank0['KL_text'] + rank1['KL_text']
        texts = global_batch['target_text']
        assert global_batch['KL_text'] == texts[1:] + texts[:1]  # x_i with y_{i+1 mod B}


def test_items_left_out_of_a_last_batch_that_does_not_divide_among_the_processes_are_warned_of(tmp_path, tokenizer,
                                                                                                capsys):
    path = tmp_path / 'pairs.jsonl'
    path.write_text(''.join(json.dumps({'prompt': f'Say {i}.', 'output_A': 'yes', 'output_B': 'no', 'label': 1}) + '\n'
                            for i in range(9)))
    two = loader(D.PairedPreferenceDataLoader, [str(path)], tokenizer, batch_size=4, rank=0, world_size=2, n_epochs=2)
    capsys.readouterr()
    assert sum(len(batch['prompt_text']) for batch in two) == 2 * (2 + 2)  # this process's half of 4 + 4 (+ 1 left out)
    assert capsys.readouterr().out == ("warning: [train] the last batch of each epoch leaves out 1 of 9 items so that "
                                       "it divides among the 2 processes (another one each epoch: the order is "
                                       "shuffled)\n")
    one = loader(D.PairedPreferenceDataLoader, [str(path)], tokenizer, batch_size=4, n_epochs=2)
    assert sum(len(batch['prompt_text']) for batch in one) == 18 and 'warning' not in capsys.readouterr().out
    path.write_text(json.dumps({'prompt': 'Say 0.', 'output_A': 'yes', 'output_B': 'no', 'label': 1}) + '\n')
    for rank in (0, 1):  # one pair (an online round's, say) on two processes: each has it, where trimming left none
        alone = loader(D.PairedPreferenceDataLoader, [str(path)], tokenizer, batch_size=4, rank=rank, world_size=2)
        assert [batch['prompt_text'] for batch in alone] == [['\n<|user|>\nSay 0.\n<|assistant|>\n']]
    assert capsys.readouterr().out.count(f"warning: [train] {path} gives 1 of what PairedPreferenceDataLoader iterates, "
                                         f"fewer than the 2 processes: repeated so that each process has one\n") == 2


def test_a_prompt_in_two_datasets_is_the_later_ones_and_a_dataset_named_twice_is_read_once(tmp_path, tokenizer,
                                                                                              capsys):
    """As in HALOs, a later dataset's prompt replaces an earlier one's: warned of, as the earlier file's feedback
    on it is not trained on."""
    binary, pairs = tmp_path / 'binary.jsonl', tmp_path / 'pairs.jsonl'
    binary.write_text(''.join(json.dumps({'prompt': f'Say {i}.', 'output': out, 'label': label}) + '\n'
                              for i in range(4) for out, label in (('yes', 1), ('no', 0))))
    pairs.write_text(''.join(json.dumps({'prompt': f'Say {i}.', 'output_A': 'sure', 'output_B': 'no', 'label': 1}) +
                             '\n' for i in range(3)))
    capsys.readouterr()
    mixed = loader(D.UnpairedPreferenceDataLoader, [str(binary), str(pairs)], tokenizer)
    assert capsys.readouterr().out.count(
        f"warning: [train] 3 of the 3 prompts of {pairs} are also prompts of {binary}, whose examples of them it "
        f"replaces (as in HALOs): give feedback on one prompt in one file to train on all of it\n") == 1
    assert sorted(mixed.full_data['\n<|user|>\nSay 0.\n<|assistant|>\n'].generations) == ['no', 'sure']
    twice = loader(D.UnpairedPreferenceDataLoader, [str(binary), str(binary)], tokenizer)
    assert f"warning: [train] datasets names {binary} twice: it is read once\n" in capsys.readouterr().out
    assert twice.counts[f'{binary}: prompts'] == 4 and len(twice.items) == 8


def test_a_file_without_records_of_a_split_adds_nothing_to_it_beside_other_datasets(tmp_path, tokenizer, capsys):
    from halos.errors import DataError
    train_only, both = tmp_path / 'train_only.jsonl', tmp_path / 'both.jsonl'
    train_only.write_text(json.dumps({'prompt': 'Hi.', 'output_A': 'a', 'output_B': 'b', 'label': 1,
                                      'split': 'train'}) + '\n')
    both.write_text(json.dumps({'prompt': 'Hello.', 'output_A': 'a', 'output_B': 'b', 'label': 1}) + '\n')
    reason = (f"{train_only}: no records for split 'test': every record's 'split' field names another split "
              f"(train); records without a 'split' field are used for both splits")
    capsys.readouterr()
    mixed = loader(D.PairedPreferenceDataLoader, [str(train_only), str(both)], tokenizer, split='test')
    assert [item.prompt for item in mixed.full_data.values()] == ['\n<|user|>\nHello.\n<|assistant|>\n']
    assert capsys.readouterr().out.startswith(
        f"warning: [test] {reason}: it adds nothing to this split, which the other datasets give\n")
    with pytest.raises(DataError) as error:
        loader(D.PairedPreferenceDataLoader, [str(train_only)], tokenizer, split='test')
    assert str(error.value) == reason


def test_sft_on_prompts_whose_outputs_are_all_undesirable_is_warned_of(tmp_path, tokenizer, capsys):
    """As in HALOs, such a prompt's SFT target is one of its undesirable outputs (the best-rewarded)."""
    binary = tmp_path / 'binary.jsonl'
    binary.write_text(''.join(json.dumps(record) + '\n' for record in [
        {'prompt': 'Hi.', 'output': 'Hello!', 'label': 1}, {'prompt': 'Hi.', 'output': 'Go away.', 'label': 0},
        {'prompt': 'Lunch?', 'output': 'No.', 'label': 0, 'reward': 0.1},
        {'prompt': 'Lunch?', 'output': 'Sandwiches, I guess.', 'label': 0, 'reward': 0.4}]))
    capsys.readouterr()
    sft = loader(D.SFTDataLoader, [str(binary)], tokenizer)
    assert sorted(target for _, target in sft.items) == ['Hello!', 'Sandwiches, I guess.']
    assert ("warning: [train] 1 of the 2 prompts have only outputs labelled undesirable, and SFT's target there is "
            "one of them (the best-rewarded, else the first; as in HALOs): leave them out of the data to imitate "
            "desirable outputs alone") in capsys.readouterr().out
    loader(D.SFTDataLoader, [str(binary)], tokenizer, split='test')  # eval.py samples their prompts: no warning
    assert 'warning' not in capsys.readouterr().out


def test_every_prompt_is_sampled_once_where_a_batch_does_not_divide_among_the_processes(tmp_path, tokenizer):
    """A last batch of prompts is filled up with repeats, marked, so that each process samples as many; the samples
    of the repeats are not kept (an online round sampling 3 prompts on 2 processes kept 2 of them)."""
    from halos.sampling import Sample, sample_records
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(json.dumps({'prompt': f'Say {i}.'}) + '\n' for i in range(3)))
    fake = lambda batch, k: [[Sample(f'{prompt_id} #{j}', [1], True) for j in range(k)]
                             for prompt_id in batch['prompt_id']]
    records, repeated = [], 0
    for rank in (0, 1):
        ranked = loader(D.PromptDataLoader, [str(path)], tokenizer, batch_size=4, rank=rank, world_size=2)
        batches = list(ranked)
        assert [len(batch['prompt_text']) for batch in batches] == [2]
        repeated += sum(batch['repeated'].count(True) for batch in batches)
        records += sample_records(fake, ranked, 2, 'test')
    assert repeated == 1 and len(records) == 3 * 2
    assert sorted(r['prompt'] for r in records) == sorted(f'Say {i}.' for i in range(3) for _ in range(2))


def test_kl_rows_are_tokenized_only_for_trainers_that_read_them(tmp_path, tokenizer):
    from helpers import make_config
    from halos.build import build_loader
    plain = loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, sequence_kinds=('target',))
    assert 'KL_combined_input_ids' not in next(iter(plain)) and 'target_combined_input_ids' in next(iter(plain))
    for loss, has_kl in (('kto', True), ('kto-zero', False), ('kto-simple', False), ('ppo', False)):
        batch = next(iter(build_loader(make_config(tmp_path, loss=loss), tokenizer, 'train')))
        assert ('KL_combined_input_ids' in batch) == has_kl, loss


def test_shuffling_is_seeded_and_the_last_partial_batch_is_kept(tokenizer):
    first = [b['target_text'] for b in loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8)]
    again = [b['target_text'] for b in loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8)]
    other = [b['target_text'] for b in loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8, seed=2)]
    assert first == again and first != other
    assert [len(b) for b in first] == [8, 8, 8, 8, 1]   # 33 prompts: nothing dropped
    capped = loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8, n_epochs=None, n_examples=20)
    assert [len(b['target_text']) for b in capped] == [8, 8, 8]   # n_examples rounds up to whole batches
    exactly_two_batches = loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8, n_epochs=None, n_examples=16)
    assert [len(b['target_text']) for b in exactly_two_batches] == [8, 8]
    assert list(loader(D.SFTDataLoader, ['hh'], tokenizer, split='test', batch_size=8, n_examples=0)) == []
    two_epochs = loader(D.SFTDataLoader, ['hh'], tokenizer, batch_size=8, n_epochs=2)
    assert len(two_epochs) == 10


def test_frac_unique_and_simple_kto_balance(tokenizer):
    kto = loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, frac_unique_desirable=0.2)
    labels = [item.is_desirable for item in kto.items]
    assert labels.count(True) == 7 and labels.count(False) == 35   # round(0.2 * 35) = 7
    simple = loader(D.SimpleKTODataLoader, ['hh'], tokenizer, batch_size=4)
    for batch in simple:
        assert batch['is_desirable'].tolist() == [True, False, True, False]


def test_a_fraction_that_keeps_none_of_a_kind_is_warned_of(tokenizer, capsys):
    kto = loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, frac_unique_desirable=0.0)
    assert not any(item.is_desirable for item in kto.items)
    assert ("warning: frac_unique_desirable=0.0 keeps none of the 35 desirable examples: the loss sees only the other "
            "kind, and evaluation too (frac_unique_* thins the test split alike, as in HALOs)\n") in capsys.readouterr().out
    loader(D.UnpairedPreferenceDataLoader, ['hh'], tokenizer, frac_unique_desirable=0.2)
    assert 'warning' not in capsys.readouterr().out


def test_data_of_one_kind_is_warned_of_and_refused_where_each_batch_needs_both(tokenizer, capsys, tmp_path):
    path = tmp_path / 'liked.jsonl'
    path.write_text(''.join(json.dumps({'prompt': f'Say {word}.', 'output': word, 'label': 1}) + '\n'
                            for word in ('hi', 'yo', 'hey', 'bye')))
    assert len(loader(D.UnpairedPreferenceDataLoader, [str(path)], tokenizer).items) == 4
    assert (f"warning: the training data ({path}) holds no undesirable examples: the loss sees only the other "
            f"kind\n") in capsys.readouterr().out
    with pytest.raises(D.DataError) as error:
        loader(D.SimpleKTODataLoader, [str(path)], tokenizer)
    assert str(error.value) == (f"{path}: SimpleKTODataLoader fills each batch with 2 desirable and 2 undesirable "
                                f"examples, and the train split holds 4 desirable and 0 undesirable ones")


def test_conditional_sft_appends_the_control_token_to_the_prompt(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({'additional_special_tokens': ['<|good|>', '<|bad|>']})
    csft = loader(D.ConditionalSFTDataLoader, ['hh'], tokenizer)
    batch = next(iter(csft))
    good, bad = tokenizer.convert_tokens_to_ids(['<|good|>', '<|bad|>'])
    for is_desirable, prompt_text, ids, labels in zip(batch['is_desirable'], batch['prompt_text'],
                                                batch['target_combined_input_ids'], batch['target_labels']):
        token, token_id = ('<|good|>', good) if is_desirable else ('<|bad|>', bad)
        assert prompt_text.endswith('\n<|assistant|>\n' + token)
        position = (ids == token_id).nonzero().item()
        assert labels[position] == -100 and labels[position + 1] != -100


def test_control_tokens_that_are_alike_or_already_text_or_the_tokenizers_own_are_refused(tokenizer, tmp_path):
    import models
    with pytest.raises(D.ConfigError, match=r"^loss.chosen_control_token and loss.rejected_control_token are both "
                                            r"'<\|x\|>': CSFT conditions on which one ends the prompt$"):
        D.ConditionalSFTDataLoader.Params(chosen_control_token='<|x|>', rejected_control_token='<|x|>')
    (tmp_path / 'feedback.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in [
        {'prompt': 'Hi.', 'output': 'Hello <|good|> there.', 'label': 1}, {'prompt': 'Yo.', 'output': 'Hey.', 'label': 0},
        {'prompt': 'Hm <|good|>?', 'output': 'Hm.', 'label': 0}]))
    with pytest.raises(D.DataError) as error:
        loader(D.ConditionalSFTDataLoader, [str(tmp_path / 'feedback.jsonl')], tokenizer)
    assert str(error.value) == (f"{tmp_path}/feedback.jsonl: record 1: the text holds '<|good|>', a CSFT control "
                                f"token (as do 1 more of the train split's 3 items): choose a token that occurs "
                                f"nowhere in the data (the default <|good|> and <|bad|>)")
    for token, what in ((tokenizer.eos_token, 'a special token'), ('hello', 'a piece of the vocabulary')):
        with pytest.raises(D.ConfigError) as error:
            models.load_tokenizer(tokenizer.name_or_path, [token, '<|bad|>'])
        assert str(error.value) == (f"control token {token!r} is already {what} of the tokenizer of "
                                    f"{tokenizer.name_or_path}: choose a token of its own (the default <|good|> and "
                                    f"<|bad|>)")
    added = models.load_tokenizer(tokenizer.name_or_path, ['<|good|>', '<|bad|>'])
    added.save_pretrained(tmp_path / 'export')  # a CSFT run's export holds its tokens: they are its own to reuse
    assert len(models.load_tokenizer(str(tmp_path / 'export'), ['<|good|>', '<|bad|>'])) == len(added)


@pytest.mark.parametrize('loader_class', [D.SFTDataLoader, D.PairedPreferenceDataLoader, D.UnpairedPreferenceDataLoader])
@pytest.mark.parametrize('name', ['hh', 'oasst'])
def test_chat_template_renders_multi_turn_prompts_in_every_loader(tokenizer, name, loader_class):
    """Every turn of a multi-turn conversation, in order and with its role, through the tokenizer's template;
    the sequences are the prompt's tokens followed by the completion's, ending in EOS."""
    templated = loader(loader_class, [name], tokenizer, use_chat_template=True, max_length=2048, max_prompt_length=1024)
    items = [item for item in templated.items if len(item[0].turns) >= 3][:4]
    assert items, f'{name} has multi-turn prompts'
    for item, element in zip(items, templated.tokenize_items(items, items)):
        example = item[0]
        prompt = element['prompt_text']
        assert prompt == tokenizer.apply_chat_template(example.turns, tokenize=False, add_generation_prompt=True)
        position = 0
        for turn in example.turns:
            role = 'assistant' if turn['role'] == 'assistant' else 'user'
            rendered = f"<|im_start|>{role}\n{turn['content']}<|im_end|>"
            assert prompt.find(rendered, position) >= 0, (turn, prompt)
            position = prompt.find(rendered, position) + len(rendered)
        assert prompt.endswith('<|im_start|>assistant\n') and '<|user|>' not in prompt
        assert element['prompt_input_ids'] == tokenizer(prompt, add_special_tokens=False)['input_ids']
        for kind in [key[:-len('_labels')] for key in element if key.endswith('_labels')]:
            completion = element[f'{kind}_input_ids']
            assert element[f'{kind}_combined_input_ids'] == element['prompt_input_ids'] + completion
            assert completion[-1] == tokenizer.eos_token_id


def test_chat_template_renders_prompts(tokenizer):
    sft = loader(D.SFTDataLoader, ['ultrabin'], tokenizer, use_chat_template=True)
    batch = next(iter(sft))
    assert batch['prompt_text'][0].startswith('<|im_start|>system\n')
    assert batch['prompt_text'][0].endswith('<|im_end|>\n<|im_start|>assistant\n')
    length = int(batch['target_attention_mask'][0].sum())
    assert batch['target_input_ids'][0][length - 1] == tokenizer.eos_token_id


def test_a_prompt_that_ends_in_the_assistants_turn_is_continued_as_trl_continues_a_final_message(tokenizer, tmp_path):
    from halos.examples import render_turns, with_completion
    prefilled = [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': 'The answer is'}]
    assert render_turns(prefilled, 'H: ', '\n', 'A: ', '<end>\n') == 'H: What is 2+2?\nA: The answer is'
    assert render_turns(prefilled[:1], 'H: ', '\n', 'A: ', '<end>\n') == 'H: What is 2+2?\nA: '
    assert with_completion(prefilled, ' 4.') == [prefilled[0], {'role': 'assistant', 'content': 'The answer is 4.'}]
    path = tmp_path / 'prompts.jsonl'
    path.write_text(json.dumps({'prompt': prefilled}) + '\n')
    prompts = loader(D.PromptDataLoader, [str(path)], tokenizer, use_chat_template=True, data_dir=None)
    assert prompts.prompt_text(prompts.items[0]) == tokenizer.apply_chat_template(
        prefilled, tokenize=False, continue_final_message=True)
    assert prompts.prompt_text(prompts.items[0]).endswith('<|im_start|>assistant\nThe answer is')


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize('file,pattern', [
    ('missing_field.jsonl', r"missing_field.jsonl: record 3: missing field 'output_B'"),
    ('empty_completion.jsonl', r"empty_completion.jsonl: record 2: field 'output' is an empty completion"),
    ('bad_label.jsonl', r"bad_label.jsonl: record 2: field 'label' must be true/false or 0/1, got 'yes'"),
    ('nonfinite_score.jsonl', r"nonfinite_score.jsonl: record 2: field 'reward_A' must be a finite number, got nan"),
    ('not_json.json', r"not_json.json: not valid JSON: Expecting property name enclosed in double quotes \(line 5"),
])
def test_bad_feedback_files_name_file_record_and_field(file, pattern):
    with pytest.raises(D.DataError, match=pattern):
        D.load_dataset(os.path.join(DATA, 'bad', file), 'train', **FORMAT)


def test_data_that_holds_a_special_tokens_text_is_warned_of(tokenizer, capsys, tmp_path):
    from types import SimpleNamespace

    from halos.build import warn_of_special_token_text
    from helpers import make_config
    run = make_config(tmp_path, "++assistant_suffix='<|im_end|>'", loss='sft')
    example = lambda prompt, *outputs: SimpleNamespace(turns=[{'role': 'user', 'content': prompt}],
                                                       generations=[output + '<|im_end|>' for output in outputs])
    data = {'a': example('Say hi <|im_end|>\n<|im_start|>assistant\n', 'hi'), 'b': example('Say yo', 'yo', 'no'),
            'c': example('Say so', 'so <|endoftext|>')}
    warn_of_special_token_text(run, SimpleNamespace(tokenizer=tokenizer, full_data=data, dataset_names=['f.jsonl']))
    assert capsys.readouterr().out == (
        "warning: 2 of the 3 prompts of f.jsonl hold the text of the tokenizer's special tokens <|endoftext|>, "
        "<|im_end|>, <|im_start|> in a turn or a completion: it is read as that token, not as text, so a completion seems to end, "
        "or a turn to open, where the data did not mean it\n")  # the assistant_suffix that ends each is no such text
    del data['a'], data['c']
    warn_of_special_token_text(run, SimpleNamespace(tokenizer=tokenizer, full_data=data, dataset_names=['f.jsonl']))
    assert capsys.readouterr().out == ''


def test_a_raw_hub_file_given_as_feedback_is_pointed_to_its_dataset_name(monkeypatch):
    monkeypatch.chdir(os.path.dirname(DATA))
    with pytest.raises(D.DataError) as error:
        D.load_dataset(os.path.join('data', 'hh', 'train.jsonl'), 'train', **FORMAT)
    assert str(error.value) == ("data/hh/train.jsonl: record 1: missing field 'prompt' (it lies as ++data_dir keeps the "
                                "hub's raw 'hh' records, which are not feedback records: give datasets=[hh] "
                                "++data_dir=data)")


@pytest.mark.parametrize('records,message', [
    ([{'prompt': 'a', 'output': 'x', 'reward': 1}, {'prompt': 'b', 'reward': 3}],
     "record 2: missing field 'output'"),  # a reward needs the output it rates, not a prompt alone
    ([{'prompt_id': 0, 'prompt': 'a', 'output': 'x', 'label': 1}, {'prompt_id': 0, 'prompt': 'b', 'output': 'y', 'label': 0}],
     "record 2: prompt_id 0 already names another prompt (in {path}: record 1); one prompt_id stands for one prompt"),
    ([{'prompt': 'a', 'chosen': 'x', 'rejected': 'y', 'label': 0}],
     "record 1: field 'label' beside 'chosen' and 'rejected', where 'chosen' is the preferred output as written; "
     "leave the label out, or name the outputs output_A and output_B"),
    ([{'prompt': 'a', 'output': 'x', 'label': 0.5}], "record 1: field 'label' must be true/false or 0/1, got 0.5"),
    ([{'prompt': 'a', 'output': [{'role': 'user', 'content': 'x'}], 'label': 1}],
     "record 1: field 'output' is a user turn; a completion is the assistant's"),
    ([{'prompt': 'a', 'output': 'x', 'label': 1}, {'prompt': ' \n', 'output': 'y', 'label': 0}],
     "record 2: field 'prompt' is empty; a prompt is the text its completions answer"),
    ([{'prompt': [{'role': 'system', 'content': ''}, {'role': 'user', 'content': ''}], 'output': 'y', 'label': 0}],
     "record 1: field 'prompt' is empty; a prompt is the text its completions answer"),
])
def test_records_that_contradict_themselves_or_each_other_are_named(tmp_path, records, message):
    path = tmp_path / 'feedback.jsonl'
    path.write_text(''.join(json.dumps(record) + '\n' for record in records))
    with pytest.raises(D.DataError) as error:
        D.load_dataset(str(path), 'train', **FORMAT)
    assert str(error.value) == f'{path}: ' + message.format(path=path)


def test_a_label_written_as_a_float_reads_as_its_integer(tmp_path):
    path = tmp_path / 'feedback.jsonl'  # as pandas writes an integer column with gaps
    path.write_text(''.join(json.dumps({'prompt': 'a', 'output': output, 'label': label}) + '\n'
                            for output, label in (('x', 1.0), ('y', 0.0))))
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert example.desirable == [True, False]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / 'feedback.jsonl'
    path.write_text('{"prompt": "a", "output": "b", "label": 1}\n{"prompt": "a", "output": \n')
    with pytest.raises(D.DataError, match=r'feedback.jsonl: record 2 \(line 2\) is not valid JSON'):
        D.load_dataset(str(path), 'train', **FORMAT)


def test_line_separators_within_json_text_are_text_and_crlf_ends_a_line(tmp_path):
    from halos.jsonl import write_jsonl
    path = tmp_path / 'feedback.jsonl'
    outputs = ['one\u2028two', 'three\u2029four\x85five']
    write_jsonl(str(path), [{'prompt': 'a', 'output': output, 'label': label} for output, label in zip(outputs, (1, 0))])
    assert '\u2028' in path.read_text(encoding='utf-8')  # written unescaped, as JSON allows
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert example.generations == outputs
    path.write_bytes(b'{"prompt": "a", "output": "b", "label": 1}\r\n{"prompt": "a", "output": "c", "label": 0}\r\n')
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert example.generations == ['b', 'c']


def test_a_json_array_in_a_jsonl_file_is_named_with_the_fix(tmp_path):
    records = [{'prompt': 'a', 'output': 'b', 'label': 1}, {'prompt': 'c', 'output': 'd', 'label': 0}]
    (tmp_path / 'feedback.jsonl').write_text(json.dumps(records) + '\n')
    with pytest.raises(D.DataError) as error:
        D.load_dataset(str(tmp_path / 'feedback.jsonl'), 'train', **FORMAT)
    assert str(error.value) == (f"{tmp_path}/feedback.jsonl: record 1: expected a JSON object, got list (the file "
                                f"holds one JSON array of records: name it .json)")
    (tmp_path / 'feedback.json').write_text(json.dumps(records))
    assert len(D.load_dataset(str(tmp_path / 'feedback.json'), 'train', **FORMAT).data) == 2


def test_json_lines_in_a_json_file_are_named_with_the_fix_and_an_upper_case_extension_is_read(tmp_path):
    records = [{'prompt': 'a', 'output': 'b', 'label': 1}, {'prompt': 'c', 'output': 'd', 'label': 0}]
    (tmp_path / 'feedback.json').write_text(''.join(json.dumps(record) + '\n' for record in records))
    with pytest.raises(D.DataError) as error:
        D.load_dataset(str(tmp_path / 'feedback.json'), 'train', **FORMAT)
    assert str(error.value) == (f"{tmp_path}/feedback.json: not valid JSON: Extra data (line 2, column 1) (one JSON "
                                f"record per line: name the file .jsonl)")
    (tmp_path / 'FEEDBACK.JSONL').write_text((tmp_path / 'feedback.json').read_text())
    check_dataset_name(str(tmp_path / 'FEEDBACK.JSONL'))  # a feedback file, not an unknown dataset
    assert len(D.load_dataset(str(tmp_path / 'FEEDBACK.JSONL'), 'train', **FORMAT).data) == 2


def test_a_lone_surrogate_escape_is_named_with_its_record_and_field_and_a_whole_pair_is_text(tmp_path):
    path = tmp_path / 'feedback.jsonl'
    path.write_text('{"prompt": "smile \\ud83d\\ude00", "output": "ok", "label": 1}\n'
                    '{"prompt": "b", "output": "cut \\ud800", "label": 0}\n')
    with pytest.raises(D.DataError) as error:
        D.load_dataset(str(path), 'train', **FORMAT)
    assert str(error.value) == (f"{path}: record 2: field 'output' holds a \\u escape of a lone UTF-16 surrogate "
                                f"(half of a character), not text")
    path.write_text('[{"prompt": [{"role": "user", "content": "x \\udc00"}], "output": "ok", "label": 1}]')
    path.rename(tmp_path / 'turns.json')
    with pytest.raises(D.DataError, match=r"record 1: field 'prompt'\[0\]\['content'\] holds"):
        D.load_dataset(str(tmp_path / 'turns.json'), 'train', **FORMAT)
    path.write_text('{"prompt": "smile \\ud83d\\ude00", "output": "ok", "label": 1}\n')
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert '\U0001F600' in example.turns[0]['content']


def test_prompt_that_leaves_no_room_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r'max_prompt_length \(256\) must be below max_length \(256\)'):
        loader(D.SFTDataLoader, ['hh'], tokenizer, max_prompt_length=256)
    sft = loader(D.SFTDataLoader, ['hh'], tokenizer)
    sft.max_prompt_length = sft.max_length   # as if the check above were bypassed
    example = next(e for e in sft.full_data.values() if len(tokenizer(e.prompt)['input_ids']) > 400)
    with pytest.raises(D.DataError, match=r"hh/train.jsonl record 10: field 'prompt' is 256 tokens and leaves no room"):
        sft.tokenize_element(example, example.prompt, {'target': 'x'})


def test_missing_data_and_names_are_clear(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"dataset 'hh': no file .*hh/train.jsonl"):
        D.load_dataset('hh', 'train', **FORMAT, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown dataset 'hhh'; valid names: alpacaeval, hh, "):
        D.load_dataset('hhh', 'train', **FORMAT)
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'b.jsonl').write_text('')
    (tmp_path / 'mine' / 'a.json').write_text('')
    with pytest.raises(ValueError) as error:
        D.load_dataset(str(tmp_path / 'mine'), 'train', **FORMAT)
    assert str(error.value) == (f"dataset '{tmp_path}/mine' is a directory: name its .json/.jsonl/.parquet files "
                                f"(datasets=[{tmp_path}/mine/a.json,{tmp_path}/mine/b.jsonl])")
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=rf"^dataset '{tmp_path}/empty' is a directory with no .json/.jsonl/.parquet file; "
                                         rf"valid names: alpacaeval, hh, "):
        D.load_dataset(str(tmp_path / 'empty'), 'train', **FORMAT)
    with pytest.raises(ConnectionError, match=r"dataset 'hh': could not fetch Anthropic/hh-rlhf .* pass \+\+data_dir=DIR"):
        D.load_dataset('hh', 'train', **FORMAT)
    with pytest.raises(ValueError, match='set n_epochs or n_examples'):
        loader(D.SFTDataLoader, ['hh'], tokenizer, n_epochs=None)
    with pytest.raises(ValueError, match=r'loss.dataloader=Nope is not a dataloader; valid: ConditionalSFTDataLoader'):
        D.get_dataloader_class('Nope')


@pytest.mark.parametrize('split, key', [('train', 'model.batch_size'), ('test', 'model.eval_batch_size')])
def test_batch_size_not_divisible_by_processes_names_the_key(tokenizer, split, key):
    with pytest.raises(ValueError, match=rf'{key} \(3\) must be divisible by the number of processes \(2\)'):
        loader(D.SFTDataLoader, ['hh'], tokenizer, split=split, batch_size=3, world_size=2)


def test_one_prompt_with_binary_and_pairwise_feedback_is_refused(tmp_path):
    path = tmp_path / 'mixed.jsonl'
    path.write_text('{"prompt": "a", "output": "b", "label": 1}\n'
                    '{"prompt": "c", "output_A": "d", "output_B": "e", "label": 1}\n'
                    '{"prompt": "a", "output_A": "f", "output_B": "g", "label": 0}\n')
    with pytest.raises(D.DataError, match=r'mixed.jsonl: record 3: this prompt already has binary feedback '
                                          r'\(first at .*mixed.jsonl: record 1\)'):
        D.load_dataset(str(path), 'train', **FORMAT)


def test_sft_target_of_undesirable_outputs_is_the_best_scored_even_at_zero(tmp_path):
    path = tmp_path / 'binary.jsonl'
    path.write_text('{"prompt": "a", "output": "worse", "label": 0, "reward": -0.5}\n'
                    '{"prompt": "a", "output": "better", "label": 0, "reward": 0.0}\n')
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert example.generations[example.sft_index] == 'better'


@pytest.mark.parametrize('name, record, says', [
    ('hh', {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello'},
     "missing field 'rejected' (a local copy of a hub dataset keeps the hub's schema: chosen, rejected)"),
    ('hh', ['\n\nHuman: Hi'], "expected an object with the fields chosen, rejected, got list (a local copy of a hub dataset keeps the "
     "hub's schema)"),
    ('shp', {'history': 'Q?', 'human_ref_A': 'a', 'human_ref_B': 'b', 'score_A': '3', 'score_B': 1, 'labels': 1},
     "field 'score_A' must be a number, got '3'"),
    ('oasst', {'message_id': 'm', 'parent_id': 7, 'rank': None, 'role': 'prompter', 'text': 'Hi', 'lang': 'en'},
     "field 'parent_id' must be a string or null, got 7"),
    ('ultrabin', {'prompt': 'Hi', 'chosen': [{'role': 'user', 'content': 'Hi'}, {'content': 'Hello'}], 'rejected': []},
     "field 'chosen' must be a string or a non-empty list of {'role', 'content'} turns"),
])
def test_a_local_copy_of_a_hub_dataset_in_another_schema_names_the_record_and_field(tmp_path, name, record, says):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'train.jsonl').write_text(json.dumps(record) + '\n')
    with pytest.raises(D.DataError) as error:
        D.load_dataset(name, 'train', **FORMAT, data_dir=str(tmp_path))
    assert str(error.value) == f"{tmp_path}/{name}/train.jsonl record 1: {says}"


def test_an_shp_pair_with_a_zero_score_has_an_infinite_ratio_and_is_kept(tmp_path):
    (tmp_path / 'shp').mkdir()
    (tmp_path / 'shp' / 'train.jsonl').write_text(json.dumps(
        {'history': 'Q?', 'human_ref_A': 'a', 'human_ref_B': 'b', 'score_A': 5, 'score_B': 0, 'labels': 1}) + '\n')
    example, = D.load_dataset('shp', 'train', **FORMAT, data_dir=str(tmp_path)).data.values()
    assert example.generations[example.pairs[0][0]] == 'a'


def test_trl_preference_and_unpaired_records_and_a_byte_order_mark_read_as_feedback(tmp_path):
    pairs = tmp_path / 'trl_pairs.jsonl'
    pairs.write_bytes(b'\xef\xbb\xbf' + json.dumps({
        'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': [{'role': 'assistant', 'content': 'Hello!'}],
        'rejected': 'Go away.'}).encode() + b'\n')
    example, = D.load_dataset(str(pairs), 'train', **FORMAT).data.values()
    assert example.generations == ['Hello!', 'Go away.'] and example.pairs == [(0, 1)]
    unpaired = tmp_path / 'trl_unpaired.jsonl'
    unpaired.write_text(json.dumps({'prompt': 'Hi', 'completion': 'Hello!', 'label': True}) + '\n' +
                        json.dumps({'prompt': 'Hi', 'completion': 'Go away.', 'label': False}) + '\n')
    example, = D.load_dataset(str(unpaired), 'train', **FORMAT).data.values()
    assert example.generations == ['Hello!', 'Go away.'] and example.desirable == [True, False]
    same = tmp_path / 'same.jsonl'
    same.write_text(json.dumps({'prompt': 'Hi', 'chosen': 'Yo.', 'rejected': 'Yo.'}) + '\n')
    with pytest.raises(D.DataError, match=r"record 1: fields 'chosen' and 'rejected' are the same text"):
        D.load_dataset(str(same), 'train', **FORMAT)


def test_trl_conversations_that_repeat_the_prompt_or_leave_it_implicit_read_as_feedback(tmp_path):
    user = lambda text: {'role': 'user', 'content': text}
    assistant = lambda text: {'role': 'assistant', 'content': text}
    history = [user('Hi'), assistant('Hello!'), user('Name a colour.')]
    path = tmp_path / 'conversations.jsonl'
    path.write_text('\n'.join(json.dumps(record) for record in [
        {'prompt': 'Hi', 'chosen': [user('Hi'), assistant('Hello!')], 'rejected': [user('Hi'), assistant('Go.')]},
        {'chosen': history + [assistant('Blue.')], 'rejected': history + [assistant('No.')]},
        {'prompt': [user('Yo')], 'completion': [user('Yo'), assistant('Hey.')], 'label': True}]) + '\n')
    hi, colour, yo = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert hi.turns == [user('Hi')] and hi.generations == ['Hello!', 'Go.'] and hi.pairs == [(0, 1)]
    assert colour.turns == history and colour.generations == ['Blue.', 'No.'] and colour.pairs == [(0, 1)]
    assert yo.turns == [user('Yo')] and yo.generations == ['Hey.'] and yo.desirable == [True]
    for record, says in [({'chosen': [user('A'), assistant('B')], 'rejected': [user('C'), assistant('D')]},
                          "missing field 'prompt', and 'chosen' and 'rejected' share no turns to take as the prompt"),
                         ({'prompt': 'Hi', 'chosen': [user('Hi'), assistant('B'), user('C'), assistant('D')],
                           'rejected': 'E'}, "field 'chosen' has 3 turns after the prompt's; a completion must be one "
                                             "assistant turn"),
                         ({'chosen': 'A', 'rejected': 'B'}, "missing field 'prompt'")]:
        path.write_text(json.dumps(record) + '\n')
        with pytest.raises(D.DataError) as error:
            D.load_dataset(str(path), 'train', **FORMAT)
        assert str(error.value) == f'{path}: record 1: {says}'


def test_trl_prompt_completion_and_messages_records_are_demonstrations_that_sft_trains_on(tmp_path, tokenizer):
    user = lambda text: {'role': 'user', 'content': text}
    assistant = lambda text: {'role': 'assistant', 'content': text}
    path = tmp_path / 'demonstrations.jsonl'
    path.write_text('\n'.join(json.dumps(record) for record in [
        {'prompt': 'Hi', 'completion': 'Hello!'},
        {'messages': [{'role': 'system', 'content': 'Be brief.'}, user('Name a colour.'), assistant('Blue.')],
         'topic': 'colours'},
        {'prompt': 'Yo', 'output': 'Hey.', 'weight': 2.0},
        {'prompt': 'Hi', 'completion': 'Hi there.'}]) + '\n')
    hi, colour, yo = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert (hi.turns, hi.generations, hi.desirable, hi.pairs) == ([user('Hi')], ['Hello!', 'Hi there.'], [], [])
    assert hi.sft_targets() == ['Hello!', 'Hi there.']  # SFT trains on every demonstration of a prompt
    targets = lambda **kwargs: sorted(text for _, text in loader(D.SFTDataLoader, [str(path)], tokenizer,
                                                                 **kwargs).items)
    assert targets() == ['Blue.', 'Hello!', 'Hey.', 'Hi there.']
    assert targets(max_prompt_count=1) == ['Blue.', 'Hello!', 'Hey.']  # eval.py samples each prompt once
    assert colour.turns == [{'role': 'system', 'content': 'Be brief.'}, user('Name a colour.')]
    assert colour.generations == ['Blue.'] and colour.extra == {'topic': 'colours'} and not colour.text_prompt
    assert yo.weights == [2.0] and hi.text_prompt
    assert held_feedback_kinds([hi, colour, yo]) == ['demonstration']
    for record, says in [({'messages': [user('Hi')]}, "field 'messages' must end with an assistant turn (the "
                                                      "completion) after at least one turn (the prompt)"),
                         ({'text': 'Once upon a time.'}, "missing field 'prompt': a record of plain text (TRL's "
                                                         "language-modelling format) has no prompt to complete"),
                         ({'prompt': 'Hi', 'output': 'A', 'type': 'binary_feedback'}, "missing field 'label'"),
                         # in a file of feedback, a record without its label (or with a null one) lacks it
                         ([{'prompt': 'Hi', 'output': 'A', 'label': 1}, {'prompt': 'Yo', 'output': 'B'}],
                          "record 2: missing field 'label'"),
                         ([{'prompt': 'Hi', 'output': 'A', 'label': None}, {'prompt': 'Yo', 'output': 'B', 'label': 0}],
                          "record 1: missing field 'label'"),
                         # in a file of scalar feedback, it lacks its reward
                         ([{'prompt': 'Hi', 'output': 'A', 'reward': 0.5}, {'prompt': 'Yo', 'output': 'B'}],
                          "record 2: missing field 'reward' (the file's other records are scalar feedback, "
                          "{\"prompt\", \"output\", \"reward\"}), or 'label' (binary feedback)"),
                         ({'prompt': 'Hi', 'messages': [user('Hi'), assistant('A')]},
                          "fields 'messages' and 'prompt' both given; a conversation is either "
                          "{\"messages\": [turns]} or {\"prompt\", \"completion\"}"),
                         ({'messages': [user('Hi'), assistant('A')], 'completion': 'B'},
                          "fields 'messages' and 'completion' both given"),
                         ({'prompt': 'Hi', 'output': 'A', 'split': 'trian'},
                          "field 'split' is 'trian'; give train or test (or no split: both)")]:
        path.write_text(''.join(json.dumps(r) + '\n' for r in (record if isinstance(record, list) else [record])))
        with pytest.raises(D.DataError) as error:
            D.load_dataset(str(path), 'train', **FORMAT)
        assert says in str(error.value)


def test_a_parquet_feedback_file_reads_as_its_json_lines_twin_its_nulls_absent_fields(tmp_path):
    import pyarrow
    import pyarrow.parquet
    records = [{'prompt': 'a', 'output_A': 'b', 'output_B': 'c', 'label': 1, 'split': 'train'},
               {'prompt': 'a', 'output_A': 'd', 'output_B': 'b', 'label': 0},
               {'prompt': 'e', 'output': 'f', 'label': 1, 'weight': 0.5},
               {'prompt': 'g', 'output': 'h', 'reward': 2.0, 'split': 'test'}]
    (tmp_path / 'feedback.jsonl').write_text(''.join(json.dumps(record) + '\n' for record in records))
    columns = list(dict.fromkeys(name for record in records for name in record))
    table = pyarrow.Table.from_pylist([{name: record.get(name) for name in columns} for record in records])
    pyarrow.parquet.write_table(table, tmp_path / 'feedback.parquet')  # a null where a record lacks a field
    for split in ('train', 'test'):
        from_json, from_parquet = (D.load_dataset(str(tmp_path / name), split, **FORMAT)
                                   for name in ('feedback.jsonl', 'feedback.parquet'))
        assert {k: vars(e) | {'dataset_name': '', 'source': ''} for k, e in from_parquet.data.items()} == \
               {k: vars(e) | {'dataset_name': '', 'source': ''} for k, e in from_json.data.items()}
    train = {e.turns[0]['content']: e for e in D.load_dataset(str(tmp_path / 'feedback.parquet'), 'train',
                                                             **FORMAT).data.values()}
    assert sorted(train) == ['a', 'e'] and train['e'].weights == [0.5] and train['e'].desirable == [True]
    assert train['a'].generations == ['b', 'c', 'd'] and train['a'].pairs == [(0, 1), (0, 2)]
    import datetime
    dated = pyarrow.Table.from_pylist([{'prompt': 'a', 'asked_on': datetime.date(2026, 12, 6)}])
    pyarrow.parquet.write_table(dated, tmp_path / 'dated.parquet')
    example, = D.load_dataset(str(tmp_path / 'dated.parquet'), 'train', **FORMAT).data.values()
    assert example.extra == {'asked_on': '2026-12-06'}  # as JSON will write it in samples and feedback
    (tmp_path / 'broken.parquet').write_bytes(b'PAR1 not really')
    with pytest.raises(D.DataError, match=rf"^{tmp_path}/broken.parquet: not readable as Parquet \(ArrowInvalid: "):
        D.load_dataset(str(tmp_path / 'broken.parquet'), 'train', **FORMAT)


def test_a_local_copy_of_a_hub_dataset_reads_from_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet
    (tmp_path / 'ultrabin').mkdir()
    rows = [json.loads(line) for line in open(os.path.join(DATA, 'ultrabin', 'train.jsonl'))]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / 'ultrabin' / 'train.parquet')
    from_parquet = D.load_dataset('ultrabin', 'train', **FORMAT, data_dir=str(tmp_path))
    from_json = D.load_dataset('ultrabin', 'train', **FORMAT, data_dir=DATA)
    assert [(e.prompt, e.generations, e.pairs) for e in from_parquet.data.values()] == \
           [(e.prompt, e.generations, e.pairs) for e in from_json.data.values()]


def test_grpo_on_oasst_rewards_the_better_ranked_reply(tokenizer):
    """OASST's rank is lower for a better reply: as a GRPO score (a reward) it enters with its sign flipped."""
    example = next(e for e in get('oasst', 'train').data.values() if len(e.generations) == 2)
    (better, worse), = example.pairs
    assert example.scores[better] > example.scores[worse]
    items = loader(D.GroupUnpairedPreferenceDataLoader, ['oasst'], tokenizer).items
    scored = {item.completion: item.score for item in items if item.example.prompt == example.prompt}
    assert scored[example.generations[better]] > scored[example.generations[worse]]


def test_a_grpo_group_larger_than_the_batch_is_cut_into_shuffled_parts(tokenizer, tmp_path, capsys):
    """A file sorted by score would otherwise give a part of the best completions and one of the worst, each
    normalised against itself."""
    path = tmp_path / 'sorted.jsonl'
    path.write_text(''.join(json.dumps({'prompt': 'Rate me.', 'output': f'answer {score}', 'reward': score}) + '\n'
                            for score in range(8, 0, -1)))
    grouped = loader(D.GroupUnpairedPreferenceDataLoader, [str(path)], tokenizer, n_epochs=3)
    assert capsys.readouterr().out.splitlines()[0] == ("warning: 1 of 1 prompts have more completions than model.batch_size=4: each "
                                       "is cut into parts of at most 4, and each part is a group of its own (its own "
                                       "mean and std); model.batch_size=8 keeps every group whole")
    parts = [[item.score for item in batch] for epoch in range(3)
             for batch in grouped.epoch_batches(random.Random(epoch))]
    assert all(len(part) == 4 for part in parts) and len(parts) == 6
    assert all(sorted(a + b) == list(range(1, 9)) for a, b in zip(parts[::2], parts[1::2]))  # whole groups
    assert any(min(part) < 5 < max(part) for part in parts)  # not only the sorted halves


def test_a_feedback_files_text_is_kept_as_written_and_a_repeated_output_is_stored_once(tmp_path):
    code = 'def f():\n    return  1'
    path = tmp_path / 'code.jsonl'
    path.write_text(''.join(json.dumps(record) + '\n' for record in [
        {'prompt': 'Write  f.', 'output_A': code, 'output_B': 'no', 'label': 1},
        {'prompt': 'Write  f.', 'output_A': code, 'output_B': 'nah', 'label': 1}]))
    example, = D.load_dataset(str(path), 'train', **FORMAT).data.values()
    assert example.generations == [code, 'no', 'nah'] and example.pairs == [(0, 1), (0, 2)]
    assert example.turns == [{'role': 'user', 'content': 'Write  f.'}]


@pytest.mark.parametrize('cls, record', [
    (D.PairedPreferenceDataLoader, {'output_A': 'Yes.', 'output_B': 'No.', 'label': 1}),
    (D.UnpairedPreferenceDataLoader, {'output': 'Yes.', 'label': 1}),
])
def test_training_items_that_all_weigh_0_are_refused_and_one_that_weighs_is_enough(tmp_path, tokenizer, cls, record):
    path = tmp_path / 'weights.jsonl'
    records = [{'prompt': f'Question {i}?', **record, 'weight': 0} for i in range(3)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    with pytest.raises(D.DataError) as error:
        loader(cls, [str(path)], tokenizer)
    assert str(error.value) == f"{path}: every one of the 3 items has weight 0, so there is nothing to train on"
    assert len(loader(cls, [str(path)], tokenizer, split='test').items) == 3  # held out: measured, not trained
    records[1]['weight'] = 0.5
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert [item.weight for item in loader(cls, [str(path)], tokenizer).items if item.weight] == [0.5]


def test_n_epochs_that_stop_a_run_before_its_n_examples_are_warned_of(tmp_path, tokenizer, capsys):
    from halos.build import build_loader, warn_of_an_unreached_n_examples
    from helpers import make_config
    for overrides, warned in [(['++n_examples=100'], True), (['++n_examples=100', '++n_epochs=4'], False),
                              (['++n_examples=100', '++n_epochs=null'], False), ([], False)]:
        run = make_config(tmp_path, *overrides, loss='sft')
        warn_of_an_unreached_n_examples(run, build_loader(run, tokenizer, 'train'))
        out = capsys.readouterr().out
        assert ("warning: n_epochs=1 stops the run after 33 examples, before n_examples=100; ++n_epochs=null trains "
                "n_examples examples" in out) == warned, (overrides, out)


def test_a_dataset_that_gives_the_loss_nothing_while_others_train_is_warned_of(tmp_path, tokenizer, capsys):
    from halos.build import build_loader, warn_of_unused_datasets
    from helpers import make_config
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Say yo."}\n')
    for loss, datasets, warned in [('sft', f'[{prompts},hh]', "warning: prompts.jsonl: loss=sft trains on none of its "
                                                              "2 prompts (they hold prompts alone), only on the other "
                                                              "datasets"),
                                   ('dpo', '[hh,shp]', None), ('grpo-online', f'[{prompts}]', None)]:
        function = [f'++online.reward_function={DATA}/upbeat/reward.py:reward'] if loss == 'grpo-online' else []
        run = make_config(tmp_path, f'datasets={datasets}', *function, loss=loss)
        warn_of_unused_datasets(run, build_loader(run, tokenizer, 'train'))
        out = capsys.readouterr().out
        assert (warned in out) if warned else 'warning' not in out, (loss, out)


def test_a_max_length_that_cuts_most_completions_or_prompts_is_warned_of(tmp_path, tokenizer, capsys):
    from halos.build import build_loader, warn_of_cuts
    from helpers import make_config
    long_text, long_prompt = ' '.join(['word'] * 60), ' '.join(['Say'] * 40) + ' hi.'
    records = [{'prompt': 'Say hi.', 'chosen': 'Hi.', 'rejected': long_text},  # one of two cut
               {'prompt': long_prompt, 'chosen': 'Hi.', 'rejected': 'Hello.'}]  # the prompt is cut: both fit
    path = tmp_path / 'pairs.jsonl'
    both_cut = [{'prompt': f'Say {word}.', 'chosen': long_text, 'rejected': long_text + '!'} for word in ('yo', 'hey')]
    long_prompts = [{'prompt': long_prompt + word, 'chosen': 'Hi.', 'rejected': 'Hello.'} for word in ('a', 'b')]
    for extra, cuts, warned in [([], (1, 4, 1, 2), ''), (both_cut, (5, 8, 1, 4), 'completions'),
                                (long_prompts, (1, 8, 3, 4), 'prompts')]:
        path.write_text(''.join(json.dumps(record) + '\n' for record in records + extra))
        run = make_config(tmp_path, f'datasets=[{path}]', '++model.max_length=32', '++model.max_prompt_length=20')
        train_loader = build_loader(run, tokenizer, 'train')
        assert train_loader.cuts() == cuts
        warn_of_cuts(run, train_loader)
        out = capsys.readouterr().out
        assert (f"warning: model.max_length=32 cuts 5 of the first 8 completions of {path} (with model.max_prompt_length="
                f"20): raise model.max_length to train on whole completions" in out) == (warned == 'completions'), out
        assert (f"warning: model.max_prompt_length=20 cuts 3 of the first 4 prompts of {path}, where a completion "
                f"would not fit after them: raise model.max_prompt_length (and model.max_length) to train on whole "
                f"prompts" in out) == (warned == 'prompts'), out
    prompts = tmp_path / 'prompts.jsonl'  # sampled, a prompt is cut wherever it is longer
    prompts.write_text(''.join(json.dumps({'prompt': prompt}) + '\n' for prompt in (long_prompt, long_prompt + '!', 'Hi.')))
    run = make_config(tmp_path, f'datasets=[{prompts}]', '++model.max_length=32', '++model.max_prompt_length=20')
    prompt_loader = build_loader(run, tokenizer, 'train', loader_class=D.PromptDataLoader)
    assert prompt_loader.cuts() == (0, 0, 2, 3)
    capsys.readouterr()
    warn_of_cuts(run, prompt_loader)
    assert capsys.readouterr().out == (f"warning: model.max_prompt_length=20 cuts 2 of the first 3 prompts of {prompts}, "
                                       f"before they are sampled: raise model.max_prompt_length (and model.max_length) "
                                       f"to train on whole prompts\n")


def test_prompt_fields_that_a_sample_record_replaces_are_warned_of_once(tmp_path, capsys):
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(json.dumps({'prompt': p, 'dataset': 'greet', 'finished': 1, 'answer': p[-3:-1]}) + '\n'
                            for p in ('Say hi.', 'Say yo.')))
    for split in ('train', 'test'):
        data = D.load_dataset(str(path), split, **FORMAT)
        assert [example.extra for example in data.data.values()] == [{'answer': 'hi'}, {'answer': 'yo'}]
    assert capsys.readouterr().out == (f"warning: {path}: prompt fields named dataset, finished are replaced by the "
                                       f"sample record's own (halos writes dataset, finished, generator, sample_id in "
                                       f"every sample), so no reward function is given them: rename them\n")
    labelled = tmp_path / 'labelled.jsonl'  # a sample record's own fields are halos': no warning
    labelled.write_text(json.dumps({'prompt': 'a', 'output': 'b', 'label': 1, 'dataset': 'x_train'}) + '\n')
    D.load_dataset(str(labelled), 'train', **FORMAT)
    assert capsys.readouterr().out == ''


def test_a_prompt_listed_twice_with_two_answers_is_refused_and_listed_twice_alike_is_one_prompt(tmp_path):
    path = tmp_path / 'prompts.jsonl'
    records = [{'prompt': 'What is 13 + 14?', 'answer': 27}, {'prompt': 'What is 2 + 2?', 'answer': 4},
               {'prompt': 'What is 13 + 14?', 'answer': 27}]
    path.write_text(''.join(json.dumps(record) + '\n' for record in records))
    assert [e.extra for e in D.load_dataset(str(path), 'train', **FORMAT).data.values()] == [{'answer': 27},
                                                                                              {'answer': 4}]
    path.write_text(''.join(json.dumps(record) + '\n' for record in records + [{'prompt': 'What is 2 + 2?',
                                                                                 'answer': 5}]))
    with pytest.raises(D.DataError) as error:
        D.load_dataset(str(path), 'train', **FORMAT)
    assert str(error.value) == (f"{path}: record 4: field 'answer' is 5, where this prompt's first record ({path}: "
                                f"record 2) gives 4: one prompt, one value")


def test_a_dataset_function_of_ones_own_that_gives_what_the_loaders_cannot_read_is_named():
    import dataclasses

    from halos.datasets import checked_dataset
    from halos.errors import DataError
    from halos.examples import Dataset, Example
    good = Example(prompt='\n<|user|>\nQ?\n<|assistant|>\n', generations=['a', 'b'], pairs=[(0, 1)], sft_index=0)

    def dataset_of(example):
        dataset = Dataset('mine')
        dataset[example.prompt if isinstance(example.prompt, str) else 'Q?'] = example
        return dataset
    assert checked_dataset(dataset_of(good), 'dataset mine (get_mine)').num_pairs() == 1
    with pytest.raises(DataError, match=r'^dataset mine \(get_mine\) returned list, not a halos.examples.Dataset$'):
        checked_dataset([good], 'dataset mine (get_mine)')
    for change, problem in [({'generations': 'ab'}, "generations is 'ab', not a list of completion strings"),
                            ({'pairs': [(0, 0)]}, 'pair (0, 0) prefers a generation to itself'),
                            ({'pairs': [(0, 2)]}, 'pair (0, 2) is not two indices of its 2 generations'),
                            ({'desirable': [True]}, 'desirable holds 1 values for its 2 generations: give one per '
                                                    'generation'),
                            ({'sft_index': 5}, 'sft_index 5 is not an index of its 2 generations'),
                            ({'prompt': None}, 'prompt is None, not a formatted prompt string')]:
        with pytest.raises(DataError) as error:
            checked_dataset(dataset_of(dataclasses.replace(good, **change)), 'dataset mine (get_mine)')
        prompt = good.prompt if change.get('prompt', '') is not None else 'Q?'
        assert str(error.value) == f"dataset mine (get_mine): the Example of prompt {prompt!r}: {problem}"
