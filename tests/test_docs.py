"""README.md and docs/: the worked examples of docs/extending.md run as written and do what the page says (the
loss equals the shipped SimpleKTO and trains; the dataset yields the Examples and items described; the
labeller gives the hand-computed scores; the sampler gives k samples per prompt and online rounds use it), every
train.py / eval.py / label.py / compare.py command line of the docs passes the start-up checks, the tables name
every loss (with the keys and values its config gives) and only paths that exist, and every link resolves.
`make docs-check` (scripts/docs_check.py) runs the commands themselves."""
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import yaml

import dataloader
import trainers
from helpers import DATA, ROOT, make_config

spec = importlib.util.spec_from_file_location('docs_check', os.path.join(ROOT, 'scripts', 'docs_check.py'))
docs_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_check)

DOCS = docs_check.doc_paths()
EXTENDING = os.path.join('docs', 'extending.md')


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
        return f.read()


def block(doc: str, language: str, after: str) -> str:
    """The first fenced block of `language` after the text `after` in `doc`."""
    text = read(doc)
    match = re.compile(rf'```{language}\n(.*?)```', re.S).search(text, text.index(after))
    return match.group(1)


def file_block(path: str) -> str:
    """The content of the block docs/extending.md writes to `path`."""
    found = [step.content for _, step in docs_check.file_blocks(read(EXTENDING)) if step.path == path]
    assert len(found) == 1, f'{EXTENDING} has {len(found)} blocks for {path}'
    return found[0]


def section(doc: str, heading: str) -> str:
    """The text of a doc from `heading` to the next heading of the same or a higher level."""
    text = read(doc)
    start = text.index(heading)
    level = len(heading) - len(heading.lstrip('#'))
    end = re.compile(rf'^#{{1,{level}}} ', re.M).search(text, start + len(heading))
    return text[start:end.start() if end else len(text)]


def test_the_readme_is_a_short_front_door():
    assert len(read('README.md').splitlines()) <= 250


# ---------------------------------------------------------------- a loss

def test_the_walkthrough_loss_equals_the_shipped_simple_kto():
    namespace = dict(vars(trainers))
    exec(file_block('trainers.py'), namespace)
    trainer_class = namespace['MySimpleKTOTrainer']
    trainer = trainer_class.__new__(trainer_class)
    shipped = trainers.SimpleKTOTrainer.__new__(trainers.SimpleKTOTrainer)
    trainer.params, shipped.params = trainer_class.Params(beta=0.1), trainers.SimpleKTOTrainer.Params(beta=0.1)
    inputs = [torch.tensor(v) for v in ([-10., -12., -8., -15.], [-11., -9., -14., -13.],
                                        [-10.5, -11., -9., -14.], [-10., -10., -13., -14.5])]
    for ours, reference in zip(trainer.loss(*inputs), shipped.loss(*inputs)):
        assert torch.allclose(ours, reference)
    assert trainer.loss(*inputs)[0].mean().item() == pytest.approx(0.504676, abs=1e-6)
    assert yaml.safe_load(file_block('config/loss/my-kto-simple.yaml'))['trainer'] == 'MySimpleKTOTrainer'


@pytest.mark.slow
def test_the_walkthrough_trains(tmp_path):
    repo = tmp_path / 'repo'
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(*docs_check.IGNORED))
    for path in ('trainers.py', 'config/loss/my-kto-simple.yaml'):
        docs_check.write_file(str(repo), next(step for _, step in docs_check.file_blocks(read(EXTENDING))
                                              if step.path == path))
    line = block(EXTENDING, 'bash', 'and train:').strip()
    assert line.startswith('python train.py loss=my-kto-simple')
    argv, _ = docs_check.shrunk(line, docs_check.Context(str(repo)))
    result = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **docs_check.ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(repo / '.cache' / 'my_kto_simple' / 'LATEST' / 'policy.pt', weights_only=True)
    assert saved['step_idx'] == 8 and 'rewards_eval/accuracies' in saved['metrics']


# ---------------------------------------------------------------- a dataset

FORMATTING = ('\n<|user|>\n', '', '\n<|assistant|>\n', '')


@pytest.fixture
def ranked_qa(tmp_path):
    """docs/extending.md's dataset, registered for the test only, with its data files in tmp_path."""
    for name in ('train', 'test'):
        path = tmp_path / 'ranked_qa' / f'{name}.jsonl'
        path.parent.mkdir(exist_ok=True)
        path.write_text(file_block(f'my_data/ranked_qa/{name}.jsonl'))
    with mock.patch.dict(dataloader.DATASETS):
        exec(file_block('dataloader.py'), dict(vars(dataloader)))
        yield str(tmp_path)


def test_the_dataset_example_fills_examples_as_described(ranked_qa):
    dataset = dataloader.load_dataset('ranked_qa', 'train', *FORMATTING, data_dir=ranked_qa)
    assert dataset.counts == {'records': 4, 'dropped: fewer than two answers': 1}
    assert len(dataset) == 3
    basil = dataset['\n<|user|>\nHow do I keep basil alive indoors?\n<|assistant|>\n']
    assert basil.turns == [{'role': 'user', 'content': 'How do I keep basil alive indoors?'}]
    assert basil.generations == ['Give it a sunny window, water it when the top of the soil is dry, and pinch off '
                                 'the flowers.', 'Water it every day.', 'Basil cannot grow indoors.']
    assert basil.pairs == [(0, 1), (0, 2), (1, 2)] and basil.sft_index == 0
    assert basil.dataset_name == 'ranked_qa' and basil.source.endswith('ranked_qa/train.jsonl record 1')
    assert dataset.num_pairs() == 5  # 3 + 1 + 1, as the page says
    assert len(dataloader.load_dataset('ranked_qa', 'test', *FORMATTING, data_dir=ranked_qa)) == 2


def test_the_dataset_example_feeds_the_loaders(ranked_qa, tokenizer):
    common = dict(data_dir=ranked_qa, n_epochs=1, max_length=128, max_prompt_length=64)
    paired = dataloader.PairedPreferenceDataLoader(['ranked_qa'], tokenizer, batch_size=5, **common)
    batch = next(iter(paired))
    pairs = set(zip(batch['chosen_text'], batch['rejected_text']))
    assert len(pairs) == 5 and ('Python: its syntax is plain and it runs everywhere.',
                                'Assembly, to learn how computers really work.') in pairs
    assert ('Water it every day.', 'Basil cannot grow indoors.') in pairs
    sft = dataloader.SFTDataLoader(['ranked_qa'], tokenizer, batch_size=3, **common)
    assert sorted(next(iter(sft))['target_text']) == [
        'About seven minutes for a firm yolk, then cool it in cold water.',
        'Give it a sunny window, water it when the top of the soil is dry, and pinch off the flowers.',
        'Python: its syntax is plain and it runs everywhere.']


# ---------------------------------------------------------------- a labeller

@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / 'my_task' / 'reward.py'
    path.parent.mkdir()
    path.write_text(file_block('my_task/reward.py'))
    return str(path)


def test_the_labeller_example_scores_known_texts_to_hand_computed_values(reward_file):
    from halos.labelers import RewardFunctionLabeler, checked_scores
    labeler = RewardFunctionLabeler(f'{reward_file}:on_topic')
    bread = 'How do I bake sourdough bread at home?'  # topic words: bake, sourdough, bread, home
    laundry = [{'role': 'user', 'content': 'Tell me about doing the laundry.'}]  # tell, about, doing, laundry
    prompts = [bread, bread, bread, laundry]
    completions = ['Bake the sourdough bread in a hot oven.',  # 3 of 4 topic words
                   ' '.join(['bread'] * 40),                   # 1 of 4, 10 words over 30: 0.25 - 0.10
                   '',                                         # nothing said
                   'Laundry is easy: sort, wash, dry.']        # 1 of 4 (a prompt given as turns)
    scores = checked_scores(labeler, prompts, completions, [f'sample {i}' for i in range(4)])
    assert scores == pytest.approx([0.75, 0.15, 0.0, 0.25])


def test_the_trl_reward_example_scores_a_batch_in_both_of_trls_forms(tmp_path):
    from halos.labelers import RewardFunctionLabeler, checked_scores
    (tmp_path / 'trl_sums.py').write_text(file_block('my_task/trl_sums.py'))
    labeler = RewardFunctionLabeler(f"{tmp_path / 'trl_sums.py'}:accuracy_reward")
    asked = [{'role': 'user', 'content': 'What is 7 + 8?'}]
    prompts = ['What is 12 + 30?', 'What is 12 + 30?', asked, asked]
    completions = ['42', 'It is 41, or 42.', 'The sum is 15.', 'fifteen']
    scores = checked_scores(labeler, prompts, completions, [f'sample {i}' for i in range(4)],
                            [{'answer': '42'}, {'answer': '42'}, {'answer': '15'}, {'answer': '15'}])
    assert scores == [1.0, 0.0, 1.0, 0.0]


def test_the_labeller_example_labels_samples_with_label_py(reward_file, tmp_path):
    import label
    prompt = [{'role': 'user', 'content': 'How do I bake sourdough bread at home?'}]
    outputs = ['Bake the sourdough bread at home.', 'Bake it.', 'I like music.', 'Sourdough bread needs time.']
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': prompt, 'output': output, 'prompt_id': 'p', 'sample_id': i})
                               + '\n' for i, output in enumerate(outputs)))
    feedback = tmp_path / 'feedback.jsonl'
    assert label.main([str(samples), str(feedback), '--reward-function', f'{reward_file}:on_topic',
                       '--feedback', 'pairwise', '--pair-mode', 'max']) == 0
    record, = [json.loads(line) for line in feedback.read_text().splitlines()]
    # scores 1.0, 0.25, 0.0, 0.5: the best against the worst
    preferred, other = (('output_A', 'output_B') if record['label'] else ('output_B', 'output_A'))
    assert (record[preferred], record[other]) == ('Bake the sourdough bread at home.', 'I like music.')


# ---------------------------------------------------------------- a sampler

@pytest.fixture(scope='module')
def sampler_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp('my_task')
    for name in ('generate_sampler.py', 'train_online.py'):
        (directory / name).write_text(file_block(f'my_task/{name}'))
    sys.path.insert(0, str(directory))
    try:
        yield directory
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop('generate_sampler', None)


def prompt_batch(tokenizer, n_prompts):
    loader = dataloader.PromptDataLoader([os.path.join(DATA, 'upbeat', 'test_prompts.jsonl')], tokenizer, split='test',
                                         batch_size=n_prompts, n_examples=n_prompts, use_chat_template=True)
    return next(iter(loader))


def test_the_sampler_example_gives_k_samples_per_prompt_of_the_declared_shape(sampler_module, tokenizer):
    import models
    from generate_sampler import generate_sampler
    from halos.sampling import Sample
    policy = models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval()
    torch.manual_seed(0)
    samples = generate_sampler(policy, tokenizer, max_new_tokens=6)(prompt_batch(tokenizer, 4), 3)
    assert len(samples) == 4 and all(len(group) == 3 for group in samples)
    for sample in (sample for group in samples for sample in group):
        assert isinstance(sample, Sample) and 1 <= len(sample.token_ids) <= 6
        assert sample.finished == (sample.token_ids[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in sample.token_ids[:-1]
        assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)


def test_the_sampler_example_is_what_online_rounds_sample_with(sampler_module, tmp_path, tokenizer, monkeypatch):
    import train
    from halos.build import build_trainer
    monkeypatch.setattr(train, 'build_online_rounds', train.build_online_rounds)  # restored after the test
    monkeypatch.setattr(sys, 'path', list(sys.path))
    namespace = {'__name__': 'train_online', '__file__': str(sampler_module / 'train_online.py')}
    exec(file_block('my_task/train_online.py'), namespace)  # replaces train.build_online_rounds (not __main__)
    assert train.build_online_rounds is namespace['build_online_rounds_with_generate']
    run = make_config(tmp_path, '++online.rounds=1', '++online.prompts_per_round=2', '++online.samples_per_prompt=2',
                      f'++online.reward_function={ROOT}/tests/rewards.py:vowels', '++max_new_tokens=5',
                      '++use_chat_template=true', datasets=f'[{DATA}/upbeat/train_prompts.jsonl]')
    trainer = build_trainer(run)
    rounds = train.build_online_rounds(run, trainer)
    sampler = rounds.make_sampler()
    assert sampler.__qualname__ == 'generate_sampler.<locals>.sample'
    samples = sampler(prompt_batch(trainer.tokenizer, 2), 2)
    assert [len(group) for group in samples] == [2, 2]
    assert all(len(sample.token_ids) <= 5 for group in samples for sample in group)


# ---------------------------------------------------------------- the commands

def doc_commands(program: str):
    """The arguments of every `python <program> ...` command line of README.md's and docs/'s bash blocks."""
    for doc in DOCS:
        for _, line in docs_check.bash_commands(read(doc)):
            words = shlex.split(line)
            if words[1] == program or (program == 'train.py' and 'mode=train' in words[2:]):
                yield words[2:]


@pytest.fixture
def docs_workdir(tmp_path, monkeypatch):
    """A working directory like the repository's root with the files the docs ask the reader to write."""
    for name in ('data', 'config', 'tests'):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    for doc in DOCS:
        for _, step in docs_check.file_blocks(read(doc)):
            if step.path.startswith(('my_task/', 'my_data/')):
                docs_check.write_file(str(tmp_path), step)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_docs_command_line_passes_the_settings_check(docs_workdir):
    """Each train.py and eval.py command of README.md and docs/ composes and passes the start-up checks (train.py's
    path, in this process; eval.py's against halos' config, its run directory standing in); label.py's and
    compare.py's parse. The walkthrough's loss=my-kto-simple needs its YAML: the slow test above runs it."""
    import compare
    import eval as eval_script
    import label
    from halos.build import run_settings
    from helpers import compose_config
    trained = [args for args in doc_commands('train.py') if 'loss=my-kto-simple' not in args]
    for args in trained:
        settings = run_settings(compose_config(args), args)
        assert settings.mode == 'train' and settings.exp_name in ' '.join(args)
    evaluated = list(doc_commands('eval.py'))
    for args in evaluated:
        overrides = [arg for arg in args if not arg.startswith('--config-path')]
        given = {arg.split('=', 1)[0] for arg in overrides}
        defaults = [default for default in ('loss=sft', 'model=tiny', 'exp_name=run', 'datasets=[hh]')
                    if default.split('=', 1)[0] not in given]
        composed = defaults + ['mode=train'] + overrides
        mode = next(arg.split('=', 1)[1] for arg in overrides if arg.startswith('++mode='))
        assert eval_script.checked(run_settings(compose_config(composed), composed)).mode == mode
    assert len(trained) >= 20 and len(evaluated) >= 8
    assert {mode for args in evaluated for mode in args if mode.startswith('++mode=')} == {
        f'++mode={mode}' for mode in ('sample', 'eval', 'alpacaeval', 'reward', 'lm_eval')}
    compared = list(doc_commands('compare.py'))
    for args in compared:
        compare.parse_args(args)
    labelled = list(doc_commands('label.py'))
    for args in labelled:
        label.parse_args(args)
    assert len(compared) >= 3 and len(labelled) >= 3


def test_docs_check_shrinks_every_command_to_the_tiny_model():
    context = docs_check.Context('/tmp/copy', judge_url='http://judge/v1')
    argv, _ = docs_check.shrunk('python train.py loss=sft model=llama7b datasets=[shp,hh,oasst] exp_name=llama7b_sft '
                                'mode=train ++cache_dir=/data/models', context)
    assert argv[:3] == [sys.executable, 'train.py', 'loss=sft'] and 'model=tiny' in argv
    assert {'++cache_dir=/tmp/copy/.cache', '++n_examples=8', '++n_eval_examples=8', f'++data_dir={DATA}',
            '++wandb.enabled=false'} <= set(argv) and '++cache_dir=/data/models' not in argv
    argv, notes = docs_check.shrunk('python train.py loss=dpo model=smollm2 exp_name=x mode=train ++online.rounds=3 '
                                    '++online.reward_function=data/upbeat/reward.py:reward ++data_dir=data', context)
    assert {'++online.rounds=1', '++online.prompts_per_round=2', '++data_dir=data',
            f'++online.reward_function={docs_check.TINY_REWARD}'} <= set(argv) and notes
    argv, _ = docs_check.shrunk('python eval.py --config-path=/data/models/llama7b_kto ++mode=sample ++n_samples=512',
                                context)
    assert '--config-path=/tmp/copy/.cache/llama7b_kto' in argv and '++n_samples=4' in argv
    argv, _ = docs_check.shrunk('python compare.py -f s.json -mc 512 --base-url http://127.0.0.1:8080/v1', context)
    assert argv[2:] == ['-f', 's.json', '--base-url', 'http://judge/v1', '-mc', '4', '-v', 'false']
    argv, _ = docs_check.shrunk('python label.py data/upbeat/samples.jsonl f.jsonl --reward-function r.py:f', context)
    assert argv[-2:] == ['--reward-function', 'r.py:f']  # shipped samples keep their reward function
    if importlib.util.find_spec('trl'):
        argv, _ = docs_check.shrunk('python bench/bench.py --trainers sft dpo --steps 6 --trl-retains-memory', context)
        assert '--smoke' in argv and argv[argv.index('--trainers') + 1:][:2] == ['sft', 'dpo']
        assert '--steps' not in argv and '--trl-retains-memory' in argv
    for skipped in ('python scripts/stackllama.py', 'python -m llama_cpp.server --model judge.gguf'):
        with pytest.raises(docs_check.Skip):
            docs_check.shrunk(skipped, context)


def test_docs_check_finds_every_command_and_file_in_reading_order():
    ordered = docs_check.steps()
    commands = [step for step in ordered if isinstance(step, docs_check.CommandStep)]
    assert commands[0].doc == 'README.md' and commands[0].line.startswith('python train.py loss=kto model=smollm2')
    files = [step.path for step in ordered if isinstance(step, docs_check.FileStep)]
    assert files == ['trainers.py', 'config/loss/my-kto-simple.yaml', 'dataloader.py', 'my_data/ranked_qa/train.jsonl',
                     'my_data/ranked_qa/test.jsonl', 'my_task/reward.py', 'my_task/sums.jsonl', 'my_task/sums.py',
                     'my_task/trl_sums.py', 'my_task/generate_sampler.py', 'my_task/train_online.py']
    position = {id(step): i for i, step in enumerate(ordered)}
    uses_reward = next(step for step in commands if 'my_task/reward.py:on_topic' in step.line)
    writes_reward = next(step for step in ordered if getattr(step, 'path', '') == 'my_task/reward.py')
    assert position[id(writes_reward)] < position[id(uses_reward)]


# ---------------------------------------------------------------- tables and links

def loss_names():
    return sorted(os.path.basename(path)[:-len('.yaml')] for path in glob.glob(os.path.join(ROOT, 'config', 'loss',
                                                                                            '*.yaml')))


def test_the_readme_table_gives_every_loss_a_line():
    table = section('README.md', '# halos')
    for name in loss_names():
        assert re.search(rf'^\|[^\n]*`{re.escape(name)}`', table, re.M), f'README.md: no line for loss={name}'


def documented_value(text: str):
    text = text.strip('`').rstrip('.,;')
    return {'null': None, 'true': True, 'false': False}.get(text, text)


def test_training_md_gives_every_loss_its_keys_with_their_config_values():
    from halos.loop import Humanline
    humanline_keys = {spec.name for spec in dataclasses.fields(Humanline)}
    for name in loss_names():
        with open(os.path.join(ROOT, 'config', 'loss', f'{name}.yaml')) as f:
            config = yaml.safe_load(f)
        trainer_class = trainers.get_trainer_class(config['trainer'])
        loader_class = dataloader.get_dataloader_class(config['dataloader'])
        text = section(os.path.join('docs', 'training.md'), f'### `loss={name}`')
        assert f'`{config["trainer"]}`' in section(os.path.join('docs', 'training.md'), '## Losses and their keys')
        documented = dict(re.findall(r'`(\w+)`\s+(`[^`]+`|[^\s,;]+)', text.split('Keys:', 1)[-1]))
        for params in (getattr(trainer_class, 'Params', None), getattr(loader_class, 'Params', None)):
            for spec in dataclasses.fields(params) if params else ():
                if spec.name in humanline_keys and spec.name not in documented:
                    assert 'the humanline keys' in ' '.join(text.split()), f'loss={name}: no humanline keys'
                    continue
                assert spec.name in documented, f'docs/training.md, loss={name}: no `{spec.name}`'
                value = config.get(spec.name, spec.default)
                shown = documented_value(documented[spec.name])
                if isinstance(value, bool) or value is None:
                    assert shown == value, f'loss={name}: {spec.name} is {value}, the doc says {shown}'
                elif isinstance(value, (int, float)):
                    assert float(shown) == pytest.approx(float(value)), f'loss={name}: {spec.name} is {value}'
                else:
                    assert shown == value, f'loss={name}: {spec.name} is {value!r}, the doc says {shown!r}'
    humanline = section(os.path.join('docs', 'training.md'), '### Humanline')
    assert '`humanline` false, `log_epsilon_P` -1.0, `log_epsilon_R` 1.5' in humanline


def test_every_path_in_where_things_live_exists():
    table = section('README.md', '## Where things live')
    paths = [path for row in re.findall(r'^\| ([^|]+) \|', table, re.M) for path in re.findall(r'`([^`]+)`', row)]
    assert len(paths) >= 30
    for path in paths:
        assert os.path.exists(os.path.join(ROOT, path)), f'README.md names {path}, which does not exist'
    assert 'halos/datasets.py' in paths


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_every_link_of_the_docs_resolves():
    for doc in DOCS:
        for target in re.findall(r'\]\(([^)\s]+)\)', read(doc)):
            if target.startswith(('http://', 'https://')):
                continue
            path, _, anchor = target.partition('#')
            resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if resolved == os.path.join('docs', 'gpu.md') and not os.path.exists(os.path.join(ROOT, resolved)):
                continue  # written beside this page, by the GPU work
            assert os.path.exists(os.path.join(ROOT, resolved)), f'{doc}: link to {target}, which does not exist'
            if anchor:
                headings = re.findall(r'^#+ (.*)$', read(resolved), re.M)
                assert anchor in {slug(heading) for heading in headings}, f'{doc}: no #{anchor} in {resolved}'


def test_differences_md_quotes_the_numbers_the_conventions_test_checks():
    text = read(os.path.join('docs', 'differences.md'))
    for number in ('**3.5**', '**0.875**', '**9**', '**12.25**', '**25**', '**NaN**', '**0.225**', '**0.45**',
                   '**0.493125**', '**0.498750**', '**0.469413**', '**0.463813**'):
        assert number in text, f'docs/differences.md does not quote {number}'
    with open(os.path.join(ROOT, 'tests', 'test_conventions.py')) as f:
        test = f.read()
    for number in ('3.5', '0.875', '9.0', '12.25', '25.0', '0.225', '0.45', '0.493125', '0.498750', '0.469413',
                   '0.463813'):
        assert number in test
