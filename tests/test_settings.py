"""The settings schema (halos/settings.py, the trainers' and loaders' Params): every key has a type, a default and
a doc; a value of the wrong type, a value outside its rule and an unknown key stop train.py before anything
loads, with one line naming the key (the same path as train.py: Hydra composition with the command-line
overrides, then the start-up checks, in this process); a handful through the real command line."""
import dataclasses
import os
import subprocess
import typing

import pytest
from omegaconf import OmegaConf

import dataloader
import trainers
from halos.build import run_settings
from halos.errors import ConfigError, UserError
from halos.settings import REQUIRED, LossSettings, ModelSettings, RunSettings, described
from helpers import ROOT, base_overrides, compose_config, make_config, train_command

CONFIG = os.path.join(ROOT, 'config')
LOSSES = sorted(name[:-len('.yaml')] for name in os.listdir(os.path.join(CONFIG, 'loss')))
SECTIONS_OF_THEIR_OWN = ('loss', 'params', 'loader_params')


def schema_keys(schema, prefix=''):
    """(key, type, rule, field) of every key of a schema, its subsections flattened."""
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        if spec.name in SECTIONS_OF_THEIR_OWN:
            continue
        if dataclasses.is_dataclass(hints[spec.name]):
            yield from schema_keys(hints[spec.name], f'{prefix}{spec.name}.')
        else:
            yield prefix + spec.name, hints[spec.name], spec.metadata.get('rule'), spec


def loss_classes(loss):
    yaml = OmegaConf.load(os.path.join(CONFIG, 'loss', f'{loss}.yaml'))
    return trainers.get_trainer_class(yaml.trainer), dataloader.get_dataloader_class(yaml.dataloader)


def keys_of(loss):
    trainer_class, loader_class = loss_classes(loss)
    return [*schema_keys(LossSettings, 'loss.'), *schema_keys(trainer_class.Params, 'loss.'),
            *schema_keys(loader_class.Params, 'loss.')]


def first_of_each(keys):
    """Each declared key once, with the first loss that has it: a key that a loss inherits (LossSettings', a base
    trainer's) is checked where it is first met; one a loss declares again, again."""
    kept, seen = [], set()
    for loss, name, kind, rule, spec in keys:
        if (name, id(spec)) not in seen:
            seen.add((name, id(spec)))
            kept.append((loss, name, kind, rule, spec))
    return kept


KEYS = first_of_each([('dpo', *key) for key in schema_keys(RunSettings)] +
                     [(loss, *key) for loss in LOSSES for key in keys_of(loss)])


def base_type(kind):
    options = [o for o in typing.get_args(kind) if o is not type(None)]
    return options[0] if typing.get_origin(kind) is typing.Union and len(options) == 1 else kind


def wrong_type(kind) -> str:
    """An override value no key of this type takes: a word for a number or a bool (or a list of numbers), a number
    for a list of strings (Hydra merges a mapping into a list), a mapping otherwise."""
    base = base_type(kind)
    if typing.get_origin(base) is list:
        return 'abc' if typing.get_args(base)[0] in (int, float) else '5'
    return 'abc' if base in (int, float) else 'maybe' if base is bool else '{a: 1}'


def bounds(reads: str) -> typing.List[str]:
    """'in [0, 1]' -> ['0', '1']."""
    return reads[3:].strip('[]() ').split(', ')


def outside(rule) -> typing.Optional[str]:
    """A value of the right type that breaks the rule."""
    if rule is None:
        return None
    if rule.reads.startswith('one of'):
        return 'not_a_choice'
    if rule.reads.startswith('>= '):
        return str(float(rule.reads[3:]) - 1).removesuffix('.0')
    if rule.reads.startswith('> '):
        return rule.reads[2:]
    if rule.reads.startswith('in ['):
        return str(float(bounds(rule.reads)[1]) + 1).removesuffix('.0')
    if rule.reads.startswith('in ('):
        return bounds(rule.reads)[0]
    return {'mean, median or a number': 'middle'}.get(rule.reads, "''")


def refused(loss, *override) -> str:
    overrides = base_overrides('/tmp/unused', loss) + list(override)
    with pytest.raises(UserError) as error:
        run_settings(compose_config(overrides), overrides)
    return str(error.value)


@pytest.mark.parametrize('loss, key, kind, rule, spec', KEYS, ids=[f'{k[0]}:{k[1]}' for k in KEYS])
def test_a_wrong_type_or_a_bad_value_of_every_key_is_named_in_one_line(loss, key, kind, rule, spec):
    values = [wrong_type(kind)] + ([outside(rule)] if rule is not None else [])
    if key in ('loss.trainer', 'loss.dataloader'):
        values = values[:1]  # a class name: an unknown one is named by the registry (below)
    for value in values:
        override = f'++{key}={value}'
        assert refused(loss, override) == f'{override}: {key} must be {described(kind, rule)}'


def test_every_key_has_a_type_a_default_and_a_one_line_doc():
    keys = [*schema_keys(RunSettings), *schema_keys(LossSettings, 'loss.'),
            *(key for loss in LOSSES for key in keys_of(loss))]
    for key, kind, rule, spec in keys:
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        assert kind is not None and default is not dataclasses.MISSING, key
        assert spec.metadata.get('doc') and '\n' not in spec.metadata['doc'], key
        if default not in (None, REQUIRED) and not isinstance(default, str) or key.endswith('optimizer'):
            assert rule is None or rule.holds(default), f'{key}: its default {default!r} breaks its own rule'


def test_the_yaml_defaults_are_the_schemas():
    """config.yaml and model/base_model.yaml list every key of their schema with its default (the YAML files are
    what users read); every shipped loss YAML passes its trainer's and loader's Params."""
    def flat(tree, prefix=''):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f'{prefix}{key}.')
            else:
                yield prefix + key, value
    top = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG, 'config.yaml')))
    top.pop('defaults')
    base_model = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG, 'model', 'base_model.yaml')))
    for yaml, schema in ((top, RunSettings), (base_model, ModelSettings)):
        defaults = {key: spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
                    for key, _, _, spec in schema_keys(schema) if not key.startswith('model.')}  # model/ is a group
        assert dict(flat(yaml)) == defaults
    for loss in LOSSES:
        scored = [f'++loss.reward_function={ROOT}/tests/rewards.py:vowels'] if loss == 'ppo-online' else \
            [f'++online.reward_function={ROOT}/tests/rewards.py:vowels'] if loss_classes(loss)[0].samples_online else []
        settings = run_settings(compose_config(base_overrides('/tmp/unused', loss) + scored))
        assert settings.loss.name == loss and isinstance(settings.loss.params, loss_classes(loss)[0].Params)


@pytest.mark.parametrize('override, message', [
    ('++bogus=1', "++bogus=1: no config defines the key 'bogus'; the keys there are"),
    ('++model.bach_size=8', "++model.bach_size=8: no config defines the key 'model.bach_size'; did you mean "
                            "model.batch_size or model.eval_batch_size?"),
    ('++model.peft.lora_rank=8', "++model.peft.lora_rank=8: no config defines the key 'model.peft.lora_rank'; did "
                                 "you mean model.peft.lora_r or model.peft.lora_alpha?"),
    ('++online.prompt_per_round=8', "++online.prompt_per_round=8: no config defines the key "
                                    "'online.prompt_per_round'; did you mean online.prompts_per_round?"),
    ('++wandb.projet=x', "++wandb.projet=x: no config defines the key 'wandb.projet'; did you mean wandb.project?"),
    ('++loss.betta=0.2', "++loss.betta=0.2: no config defines the key 'loss.betta'; did you mean loss.beta?"),
    ('++loss.gamma=0.2', "++loss.gamma=0.2: no config defines the key 'loss.gamma'; DPOTrainer.Params declares "
                         "humanline, log_epsilon_P, log_epsilon_R, beta (a loss declares its keys in its trainer's "
                         "Params)"),
    ('++max_grad_norm=5', "++max_grad_norm=5: no config defines the key 'max_grad_norm'; did you mean "
                          "model.max_grad_norm?"),
    ('++model.rounds=2', "++model.rounds=2: no config defines the key 'model.rounds'; did you mean online.rounds?"),
    ('++loss.trainer=NoSuchTrainer', "loss.trainer=NoSuchTrainer is not a trainer; valid: "),
    ('++online=3', "++online=3: online must be a group of keys (rounds, prompts, "),
])
def test_an_unknown_key_names_the_closest_ones_that_exist(override, message):
    assert refused('dpo', override).startswith(message)


def test_a_trainer_of_ones_own_without_a_loss_or_a_family_that_computes_one_is_named(monkeypatch):
    from halos.loop import BasicTrainer
    monkeypatch.setattr(trainers, 'BareTrainer', type('BareTrainer', (BasicTrainer,), {}), raising=False)
    monkeypatch.setattr(trainers, 'NoLossTrainer', type('NoLossTrainer', (trainers.PairedPreferenceTrainer,), {}),
                        raising=False)
    with pytest.raises(ConfigError) as error:
        trainers.get_trainer_class('BareTrainer')
    assert str(error.value) == (
        "loss.trainer=BareTrainer: it subclasses BasicTrainer, which computes no loss; subclass the family of its data "
        "instead (SFTTrainer, PairedPreferenceTrainer, UnpairedPreferenceTrainer, ...; docs/extending.md) and write "
        "its loss()")
    with pytest.raises(ConfigError) as error:
        trainers.get_trainer_class('NoLossTrainer')
    assert str(error.value) == ("loss.trainer=NoLossTrainer: it has no loss() method, which its family calls with the "
                                "batch's log-probs (docs/extending.md)")


def test_a_number_written_as_a_string_is_that_number(tmp_path):
    """As a YAML value quoted by hand ("128") reads: an integer or a float key takes it."""
    run = make_config(tmp_path, "++model.max_length='256'", "++lr='1e-5'")
    assert (run.model.max_length, run.lr) == (256, 1e-5) and isinstance(run.model.max_length, int)
    assert refused('dpo', "++model.max_length='25.6'") == "++model.max_length='25.6': model.max_length must be an " \
                                                          "integer >= 2"


def test_a_number_that_is_not_finite_is_named_as_such():
    assert refused('grpo-online', '++online.reward_weights=[nan,1]') == (
        '++online.reward_weights=[nan,1]: online.reward_weights must be a list of numbers (or one number) or null '
        '(nan is not finite)')
    assert refused('dpo', "++lr='-inf'") == "++lr='-inf': lr must be a number > 0 (-inf is not finite)"
    assert refused('dpo', '++optimizer=inf').endswith('RMSprop, Rprop, SGD')  # not a number key: no such note


def test_humanline_on_a_trainer_of_ones_own_without_a_reference_is_refused(tmp_path, monkeypatch):
    from halos.loop import Humanline

    @dataclasses.dataclass(frozen=True)
    class Params(trainers.SLiCTrainer.Params, Humanline):
        pass
    monkeypatch.setattr(trainers, 'ClampedSLiCTrainer', type('ClampedSLiCTrainer', (trainers.SLiCTrainer,),
                                                              {'Params': Params}), raising=False)
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, '++loss.trainer=ClampedSLiCTrainer', '++loss.humanline=true', loss='slic')
    assert str(error.value) == ("loss.humanline=true: ClampedSLiCTrainer loads no reference model, whose per-token "
                                "log-ratios humanline clamps")


def test_a_params_class_of_ones_own_with_a_default_or_a_type_that_settings_cannot_hold_is_named():
    from typing import Tuple

    from halos.settings import Overrides, greater_than, setting, typed

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = setting(-1.0, 'the temperature', greater_than(0))

    @dataclasses.dataclass(frozen=True)
    class Steps:
        steps: int = setting(2.5, 'inner steps')

    @dataclasses.dataclass(frozen=True)
    class Pair:
        weights: Tuple[float, float] = setting((1.0, 1.0), 'two weights')

    @dataclasses.dataclass(frozen=True)
    class Misspelt:
        beta: 'flaot' = setting(0.1, 'the temperature')  # noqa: F821
    expected = [
        (Params, {}, f"{Params.__qualname__}.beta: its default -1.0 is not a number > 0; declare a default that is"),
        (Steps, {'steps': 2}, f"{Steps.__qualname__}.steps: its default 2.5 is not an integer; declare a default that is"),
        (Pair, {'weights': [1.0, 0.5]}, f"{Pair.__qualname__}.weights: its type Tuple[float, float] is not one a "
                                        f"setting reads (bool, int, float, str, Any, a List of one of them, or an "
                                        f"Optional or Union of these)"),
        (Misspelt, {}, f"{Misspelt.__qualname__}: the type of one of its keys names what is not defined (name 'flaot' "
                       f"is not defined)")]
    for schema, node, message in expected:
        with pytest.raises(ConfigError) as error:
            typed(schema, node, Overrides(), 'loss.')
        assert str(error.value) == message
    with pytest.raises(ConfigError):  # the class is checked, whether or not the key is given
        typed(Params, {'beta': 0.5}, Overrides(), 'loss.')


@pytest.mark.parametrize('name', ['..', 'runs/../..', 'a//b', 'a/'])
def test_a_run_name_stays_a_directory_under_cache_dir(name):
    assert refused('dpo', f'exp_name={name}') == (
        f"exp_name={name}: exp_name must be a directory name under cache_dir, or a path of them (no empty, '.' or "
        f"'..' part)")


@pytest.mark.parametrize('override, suggested', [('++optimizer=adamw', 'AdamW'), ('mode=trian', 'train'),
                                                 ('++model.policy_dtype=bfloat', 'bfloat16')])
def test_a_value_close_to_a_choice_names_it(override, suggested):
    message = refused('dpo', override)
    assert message.startswith(f'{override}: ') and message.endswith(f' (did you mean {suggested}?)')


def test_keys_that_must_agree_are_checked_together():
    assert refused('dpo', '++model.max_prompt_length=512') == \
        "model.max_prompt_length (512) must be below model.max_length (128), or no room is left for a completion"
    assert refused('dpo', '++n_epochs=null') == "set n_epochs or n_examples (both are null)"
    assert refused('sft', '++loss.humanline=true').startswith("loss.humanline: SFTTrainer takes no humanline")
    for loss in ('ppo', 'grpo'):
        assert refused(loss, '++cache_reference_logprobs=true') == \
            f"loss={loss} needs per-token reference log-probs: set cache_reference_logprobs=false"
    assert refused('dpo', '++loss.log_epsilon_P=0.5') == (
        "loss.log_epsilon_P=0.5, loss.log_epsilon_R=1.5: the band must hold 0 (log_epsilon_P <= 0 <= log_epsilon_R), "
        "or the reference itself is clamped")
    assert refused('dpo', '++loss.log_epsilon_P=0', '++loss.log_epsilon_R=0') == (
        "loss.log_epsilon_P=loss.log_epsilon_R=0.0: a band of no width clamps every token's log-ratio to 0 and leaves "
        "no gradient, so nothing would train")
    assert refused('dpo', '++lr=${nope}') == "++lr=${nope}: Interpolation key 'nope' not found"
    assert refused('ppo-online', '++loss.reward_function=no_such_file.py:reward') == \
        "reward function 'no_such_file.py:reward': no file no_such_file.py"
    reward = f'++online.reward_function={ROOT}/tests/rewards.py:vowels'
    assert refused('dpo', '++online.rounds=1') == "online.labeler=function needs online.reward_function to be set"
    assert refused('dpo', '++online.rounds=1', '++online.reward_model=/models/rm') == (
        "online.labeler=function needs online.reward_function to be set (online.reward_model is set: add "
        "online.labeler=reward_model to score with it)")
    overrides = base_overrides('/tmp/unused') + ['++online.rounds=1', reward, '++online.samples_per_prompt=1']
    with pytest.raises(ConfigError) as error:
        run_settings(compose_config(overrides), overrides)
    assert str(error.value) == ("online.samples_per_prompt=1: online.feedback=pairwise compares the samples of a "
                                "prompt, so it needs at least 2")
    one = ['++online.rounds=1', reward, '++online.samples_per_prompt=1']
    assert refused('sft', *one, '++online.feedback=best') == (
        "online.samples_per_prompt=1: online.feedback=best compares the samples of a prompt, so it needs at least 2")
    assert refused('kto', *one, '++online.feedback=binary', '++online.per_prompt=true') == (
        "online.samples_per_prompt=1: online.feedback=binary with online.per_prompt=true compares the samples of a "
        "prompt, so it needs at least 2")
    assert refused('dpo', '++online.rounds=1', reward, '++online.feedback=binary') == \
        "online.feedback=binary: loss=dpo trains on pairwise feedback; set online.feedback=pairwise"
    assert refused('kto', '++online.rounds=1', reward, '++online.feedback=scalar') == \
        "online.feedback=scalar: loss=kto trains on binary or pairwise feedback; set online.feedback=binary"
    accepted = base_overrides('/tmp/unused', 'sft') + ['++online.rounds=1', reward, '++online.feedback=scalar']
    assert run_settings(compose_config(accepted), accepted).online.feedback == 'scalar'  # SFT on each prompt's best
    greedy = ("temperature=0 decodes greedily, so the samples of a prompt are alike and {what}: set temperature > 0 "
              "(null: the model's)")
    assert refused('dpo', '++online.rounds=1', reward, '++temperature=0') == \
        greedy.format(what='online.feedback=pairwise has nothing to compare')
    assert refused('grpo-online', reward, '++temperature=0') == \
        greedy.format(what="loss=grpo-online's advantages, which compare them, are all 0")
    for loss, greedy_is_fine in (('reinforce-pp', [reward]),
                                 ('kto', ['++online.rounds=1', reward, '++online.feedback=binary'])):
        settings = base_overrides('/tmp/unused', loss) + greedy_is_fine + ['++temperature=0']
        assert run_settings(compose_config(settings), settings).temperature == 0  # a baseline across prompts, labels


def test_eval_py_checks_no_training_setting_it_does_not_use():
    """A run directory's config holds the run's online labeller: sampling from it neither needs nor imports it."""
    overrides = base_overrides('/tmp/unused') + ['++online.rounds=1', '++online.reward_function=gone.py:reward',
                                                 '++mode=sample']
    assert run_settings(compose_config(overrides), overrides).online.reward_function == 'gone.py:reward'


def test_datasets_are_not_needed_by_online_rounds_with_their_own_prompts():
    prompts = os.path.join(ROOT, 'data', 'upbeat', 'train_prompts.jsonl')
    overrides = [o for o in base_overrides('/tmp/unused') if not o.startswith('datasets=')] + [
        '++online.rounds=1', f'++online.prompts={prompts}', f'++online.reward_function={ROOT}/tests/rewards.py:vowels']
    settings = run_settings(compose_config(overrides), overrides)
    assert settings.datasets == [] and settings.online.prompts == [prompts]  # one path stands for a list of one
    assert run_settings(compose_config(overrides + ['datasets=null']), overrides).datasets == []
    offline = [o for o in overrides if not o.startswith('++online.rounds')]
    with pytest.raises(ConfigError, match=r'^missing required config keys: datasets \(e.g. datasets=\[hh\]\)$'):
        run_settings(compose_config(offline), offline)


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_the_command_line_ends_a_bad_setting_with_one_line_and_status_2(tmp_path):
    """The real train.py, five mistakes at once (each process stops before it loads a model)."""
    cases = {
        'lr': (['++lr=abc'], 'train.py: ++lr=abc: lr must be a number > 0'),
        'batch_size': (['++model.batch_size=0'], 'train.py: ++model.batch_size=0: model.batch_size must be an '
                                                 'integer >= 1'),
        'n_examples': (['++n_examples=-4'], 'train.py: ++n_examples=-4: n_examples must be an integer >= 1 or null'),
        'beta': (['++loss.beta=-0.1'], 'train.py: ++loss.beta=-0.1: loss.beta must be a number > 0'),
        'no ++': (['loss.humanline=true'], "train.py: loss.humanline=true: the config files do not list "
                                           "loss.humanline; set it with ++loss.humanline=true"),
        'no ++ for another loss': (['loss.desirable_weight=2'],
                                "train.py: loss.desirable_weight=2: the chosen loss's config does not list "
                                "loss.desirable_weight, a key of loss=kto: with a loss that reads it, set it with "
                                "++loss.desirable_weight=2"),
    }
    env = {key: value for key, value in os.environ.items() if key != 'HYDRA_FULL_ERROR'}
    processes = {name: subprocess.Popen(train_command(tmp_path, *overrides, f'hydra.run.dir={tmp_path / name}'),
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for name, (overrides, _) in cases.items()}
    unknown_loss = subprocess.run(train_command(tmp_path, loss='dpoo'), cwd=ROOT, capture_output=True, text=True,
                                  env=env, timeout=300)
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and 'Traceback' not in stderr, stderr[-2000:]
        assert last_line(stderr) == cases[name][1]
    assert unknown_loss.returncode == 2 and 'Traceback' not in unknown_loss.stderr
    assert last_line(unknown_loss.stderr) == f"train.py: loss=dpoo: config/loss has no dpoo.yaml; the choices are " \
                                             f"{', '.join(LOSSES)}"


def test_a_copied_loss_yaml_that_keeps_another_losss_name_is_warned_of(tmp_path):
    (tmp_path / 'config' / 'loss').mkdir(parents=True)
    (tmp_path / 'config' / 'loss' / 'kto-copy.yaml').write_text(open(os.path.join(ROOT, 'config', 'loss',
                                                                                  'kto.yaml')).read())
    command = train_command(tmp_path, f'--config-dir={tmp_path / "config"}', loss='kto-copy')
    command[command.index('datasets=[hh]')] = f'datasets=[{tmp_path / "missing.jsonl"}]'  # stops before the models
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and last_line(result.stderr).endswith('missing.jsonl: no such file (a .json/.jsonl/'
                                                                        '.parquet file of feedback records or prompts)')
    assert result.stdout.splitlines()[0] == (
        "warning: loss=kto-copy chose kto-copy.yaml, whose name: is kto; this run is known as loss=kto in its messages, "
        "its config.yaml and a resume's check: write name: kto-copy in kto-copy.yaml")


def test_another_runs_config_with_a_new_exp_name_or_cache_dir_trains_in_its_own_directory(tmp_path):
    """train.py --config-path=<a run> exp_name=new: the config.yaml names the old run's directory and policy."""
    import train
    old = str(tmp_path / 'old')
    saved = dataclasses.replace(make_config(tmp_path), local_run_dir=old, saved_policy=f'{old}/LATEST/policy.pt')
    renamed = train.in_its_own_run_dir(dataclasses.replace(saved, exp_name='new'), ['exp_name=new'])
    assert (renamed.local_run_dir, renamed.saved_policy) == (f'{tmp_path}/new', f'{tmp_path}/new/LATEST/policy.pt')
    moved = train.in_its_own_run_dir(dataclasses.replace(saved, cache_dir='/data'), ['++cache_dir=/data'])
    assert moved.local_run_dir == '/data/test'
    again = train.in_its_own_run_dir(saved, ['++n_epochs=2'])  # the same run, trained again in its directory
    assert (again.local_run_dir, again.saved_policy) == (old, f'{old}/LATEST/policy.pt')
    assert train.in_its_own_run_dir(saved, ['exp_name=test', f'++local_run_dir={old}']).local_run_dir == old


def test_a_reference_cache_without_a_reference_model_is_warned_of(tmp_path, capsys):
    for loss in ('simpo', 'sft'):
        make_config(tmp_path, '++cache_reference_logprobs=true', loss=loss)
        assert capsys.readouterr().out == (f"warning: cache_reference_logprobs=true, but loss={loss} loads no reference "
                                           f"model with these settings, so there is nothing to cache\n")
    make_config(tmp_path, '++cache_reference_logprobs=true', loss='kto')
    assert 'warning' not in capsys.readouterr().out


def test_policy_gradient_keys_that_do_nothing_and_odd_clip_ranges_are_warned_of(tmp_path, capsys):
    reward = f'++online.reward_function={ROOT}/tests/rewards.py:vowels'
    warned = {
        ('grpo-online', '++loss.max_refills=7'): "loss.max_refills set, but loss.dynamic_sampling=false replaces no "
        "group: ++loss.dynamic_sampling=true replaces the groups whose scores are all equal",
        ('grpo-online', '++loss.max_completion_length=50'): "loss.max_completion_length set, but "
        "loss.loss_type=grpo does not read it: dr_grpo alone divides by that constant",
        ('dr-grpo', '++loss.max_completion_length=10', '++max_new_tokens=100'): "loss.max_completion_length=10 is "
        "below max_new_tokens=100: dr_grpo divides by it as the longest a completion can be, so a long completion's "
        "tokens weigh more than one sequence; set it to max_new_tokens, as TRL does",
        ('grpo-online', '++loss.epsilon=1.5'): "loss.epsilon=1.5 puts the clip range's lower side at -0.5: a ratio, "
        "always > 0, is never clipped from below",
        ('rloo', '++loss.epsilon=0.3', '++loss.epsilon_high=0.1'): "loss.epsilon_high=0.1 is below loss.epsilon=0.3: "
        "the clip range is narrower above 1 than below, the reverse of DAPO's clip-higher",
    }
    for (loss, *overrides), warning in warned.items():
        make_config(tmp_path, reward, *overrides, loss=loss)
        assert capsys.readouterr().out == f'warning: {warning}\n'
    for loss in ('grpo-online', 'dr-grpo', 'dapo', 'gspo', 'rloo', 'reinforce-pp', 'grpo'):
        make_config(tmp_path, *([] if loss == 'grpo' else [reward]), loss=loss)  # each preset as shipped
        assert 'warning' not in capsys.readouterr().out


def test_kto_weights_off_the_papers_band_and_other_settings_that_train_badly_are_warned_of(tmp_path, capsys):
    from types import SimpleNamespace

    from halos.build import warn_of_unbalanced_kto_weights
    counts = SimpleNamespace(counts={'unary: desirable': 322, 'unary: undesirable': 118})
    warn_of_unbalanced_kto_weights(make_config(tmp_path, loss='kto'), counts)
    assert capsys.readouterr().out == (
        "warning: loss=kto: desirable_weight x 322 desirable / (undesirable_weight x 118 undesirable) = 2.73, outside "
        "the [1, 4/3] that KTO's paper recommends: ++loss.undesirable_weight=2.73 makes it 1\n")
    for overrides, loss in ((['++loss.undesirable_weight=2.5'], 'kto'), ([], 'kto-zero')):  # 1.09; no weights
        warn_of_unbalanced_kto_weights(make_config(tmp_path, *overrides, loss=loss), counts)
        assert capsys.readouterr().out == ''
    make_config(tmp_path, '++online.rounds=1', f'++online.reward_function={ROOT}/tests/rewards.py:vowels',
                '++online.feedback=binary', '++online.reference=previous', '++loss.humanline=true', loss='kto')
    assert capsys.readouterr().out == (
        "warning: online.reference=previous, but loss.humanline=true moves the reference to the policy at every step, "
        "so the round's start is never the reference\n")
    make_config(tmp_path, '++model.policy_dtype=float16', loss='sft')
    assert capsys.readouterr().out.startswith("warning: model.policy_dtype=float16 keeps the weights and the "
                                              "optimizer's state in float16, without loss scaling")
    make_config(tmp_path, '++model.batch_size=1', loss='kto')
    assert capsys.readouterr().out == (
        "warning: model.batch_size=1: loss=kto estimates its reference point from each prompt paired with another "
        "item's completion in the batch, and a batch of one pairs it with its own: use model.batch_size >= 2\n")


def test_online_keys_of_an_offline_run_and_lora_keys_without_lora_are_warned_of(tmp_path, capsys):
    make_config(tmp_path, '++online.reward_function=r.py:f', '++online.prompts_per_round=4',
                '++online.eval_prompts=[held.jsonl]', loss='sft')
    assert ("warning: online.prompts_per_round, online.reward_function set, but loss=sft with online.rounds=0 trains "
            "offline on its datasets and reads no online key: ++online.rounds=N trains in online rounds"
            in capsys.readouterr().out)
    make_config(tmp_path, '++online.eval_prompts=[held.jsonl]', loss='sft')  # eval.py ++mode=reward reads it
    assert 'warning' not in capsys.readouterr().out
    make_config(tmp_path, '++model.peft.lora_r=8', loss='sft')
    assert ("warning: model.peft.lora_r set, but model.use_peft=false trains every weight: ++model.use_peft=true "
            "trains LoRA adapters" in capsys.readouterr().out)
    make_config(tmp_path, '++model.peft.lora_r=8', '++model.use_peft=true', loss='sft')
    assert 'warning' not in capsys.readouterr().out
    make_config(tmp_path, '++loss.log_epsilon_P=-2', loss='dpo')
    assert ("warning: loss.log_epsilon_P set, but loss.humanline=false clamps no log-ratio: ++loss.humanline=true "
            "clamps each token's log-ratio to the band" in capsys.readouterr().out)
    make_config(tmp_path, '++loss.log_epsilon_P=-2', '++loss.humanline=true', loss='dpo')
    assert 'warning' not in capsys.readouterr().out


def test_a_loss_yaml_without_its_name_is_refused():
    """The name is what a resume checks: a run saved without one would resume under any loss."""
    from halos.build import loss_settings
    from halos.settings import Overrides
    with pytest.raises(ConfigError) as error:
        loss_settings({'trainer': 'DPOTrainer', 'dataloader': 'PairedPreferenceDataLoader', 'beta': 0.1}, Overrides([]))
    assert str(error.value) == ("missing required config keys: loss.name (a loss YAML names all three: its name, which "
                                "a resume checks, its trainer and its dataloader)")


def test_a_loss_whose_dataloader_does_not_give_what_its_trainer_reads_is_refused(tmp_path):
    for loss, loader, says in [
            ('kto-simple', 'PairedPreferenceDataLoader', "loss.dataloader=PairedPreferenceDataLoader does not give what "
             "loss.trainer=SimpleKTOTrainer trains on (target sequences, labelled with is_desirable); these do: "
             "ConditionalSFTDataLoader, SimpleKTODataLoader, UnpairedPreferenceDataLoader"),
            ('grpo', 'UnpairedPreferenceDataLoader', "loss.dataloader=UnpairedPreferenceDataLoader does not give what "
             "loss.trainer=GRPOTrainer trains on (target sequences, labelled with score and prompt_id); these do: "
             "GroupUnpairedPreferenceDataLoader"),
            ('kto', 'SimpleKTODataLoader', None),  # it gives KL rows to a trainer that reads them
            ('kto', 'ConditionalSFTDataLoader', "loss.dataloader=ConditionalSFTDataLoader does not give what "
             "loss.trainer=KTOTrainer trains on (target and KL sequences, labelled with is_desirable); these do: "
             "SimpleKTODataLoader, UnpairedPreferenceDataLoader"),
            ('grpo-online', 'SFTDataLoader', "loss.dataloader=SFTDataLoader does not give what "
             "loss.trainer=GRPOOnlineTrainer trains on (prompts alone); these do: PromptDataLoader"),
            ('dpo', 'PromptDataLoader', "loss.dataloader=PromptDataLoader does not give what loss.trainer=DPOTrainer "
             "trains on (chosen and rejected sequences); these do: PairedPreferenceDataLoader")]:
        overrides = [f'++loss.dataloader={loader}', f'++online.reward_function={ROOT}/tests/rewards.py:vowels']
        if says is None:
            make_config(tmp_path, *overrides, loss=loss)
            continue
        with pytest.raises(ConfigError) as error:
            make_config(tmp_path, *overrides, loss=loss)
        assert str(error.value) == says


def test_saved_adapters_without_lora_are_refused_and_lora_keys_beside_them_are_warned_of(tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, '++model.load_lora_from=run/LATEST/adapter', loss='sft')
    assert str(error.value) == ("model.load_lora_from=run/LATEST/adapter continues saved LoRA adapters: set "
                                "model.use_peft=true (without it the run trains every weight and never loads them)")
    make_config(tmp_path, '++model.load_lora_from=run/LATEST/adapter', '++model.use_peft=true', '++model.peft.lora_r=8',
                loss='sft')
    assert ("warning: model.peft.lora_r set, but the adapters of model.load_lora_from=run/LATEST/adapter keep the "
            "settings of their adapter_config.json" in capsys.readouterr().out)


def test_a_max_new_tokens_that_max_length_never_leaves_room_for_is_warned_of(tmp_path, capsys):
    make_config(tmp_path, '++max_new_tokens=500', '++model.max_length=128', loss='sft')
    assert ("warning: max_new_tokens=500 is not below model.max_length=128, which bounds a prompt and its completion "
            "together: a completion gets at most max_length less its prompt's tokens") in capsys.readouterr().out
    make_config(tmp_path, '++max_new_tokens=100', '++model.max_length=128', loss='sft')
    assert 'warning' not in capsys.readouterr().out


def test_online_ppo_is_warned_of_online_keys_it_does_not_read_and_not_of_its_sampler(tmp_path, capsys):
    function = f'++loss.reward_function={ROOT}/tests/rewards.py:vowels'
    make_config(tmp_path, function, '++online.sampler=halos', loss='ppo-online')
    assert 'warning' not in capsys.readouterr().out
    make_config(tmp_path, function, '++online.reward_function=r.py:f', '++online.eval_prompts=[held.jsonl]',
                loss='ppo-online')
    assert ("warning: online.reward_function, online.eval_prompts set, but loss=ppo-online with online.rounds=0 samples "
            "with its own keys (loss.reward_function, loss.reward_model) and reads no other online key: it evaluates "
            "on the test split of its datasets" in capsys.readouterr().out)


def test_online_feedback_options_that_the_feedback_kind_would_ignore_are_refused(tmp_path):
    common = ['++online.rounds=1', f'++online.reward_function={ROOT}/tests/rewards.py:vowels']
    for loss, overrides, says in [
            ('dpo', ['++online.per_prompt=true'], 'online.per_prompt applies to online.feedback=binary, not pairwise'),
            ('kto', ['++online.feedback=binary', '++online.pair_mode=min'],
             'online.pair_mode applies to online.feedback=pairwise, not binary'),
            ('dpo', ['++online.threshold=mean'],
             'online.threshold=mean: pairwise feedback takes the least reward gap of a pair, a number'),
            ('dpo', ['++online.threshold=median'],  # the value binary feedback takes when none is given
             'online.threshold=median: pairwise feedback takes the least reward gap of a pair, a number'),
            ('grpo', ['++online.feedback=scalar', '++online.pair_mode=max'],
             'online.pair_mode applies to online.feedback=pairwise, not scalar'),
            ('grpo', ['++online.feedback=best'], 'online.feedback=best keeps one sample of each prompt, and loss=grpo '
                                                 'compares the samples of a prompt: set online.feedback=scalar')]:
        with pytest.raises(ConfigError) as error:
            make_config(tmp_path, *common, *overrides, loss=loss)
        assert str(error.value) == says
    make_config(tmp_path, *common, '++online.feedback=binary', '++online.per_prompt=true', '++online.threshold=mean',
                loss='kto')  # each read by binary feedback


def test_fractions_that_a_loss_does_not_read_and_formatting_a_chat_template_replaces_are_warned_of(tmp_path, capsys):
    make_config(tmp_path, '++frac_unique_desirable=0.5', '++human_prefix=Human: ', '++use_chat_template=true', loss='dpo')
    out = capsys.readouterr().out
    assert ("warning: frac_unique_desirable set, but loss=dpo trains on every item of its data: they keep a share of "
            "the desirable and undesirable examples of the unpaired losses") in out
    assert ("warning: human_prefix set, but use_chat_template=true formats the turns with the tokenizer's chat "
            "template instead") in out
    make_config(tmp_path, '++frac_unique_desirable=0.5', '++human_prefix=Human: ', loss='kto')  # both read here
    assert 'warning' not in capsys.readouterr().out


def test_a_reward_source_that_the_chosen_labeler_does_not_read_is_warned_of(tmp_path, capsys):
    make_config(tmp_path, '++online.rounds=1', '++online.labeler=judge', '++online.judge=j',
                f'++online.reward_function={ROOT}/tests/rewards.py:vowels', loss='dpo')
    assert ("warning: online.reward_function set, but online.labeler=judge scores with online.judge "
            "(online.eval_reward_function scores the held-out samples)") in capsys.readouterr().out


def test_reward_models_are_read_relative_to_cache_dir_like_load_from(tmp_path):
    os.makedirs(tmp_path / 'rm' / 'LATEST' / 'hf')
    online = make_config(tmp_path, '++online.rounds=1', '++online.labeler=reward_model',
                         '++online.reward_model=rm/LATEST/hf', loss='dpo')
    assert online.online.reward_model == str(tmp_path / 'rm' / 'LATEST' / 'hf')
    ppo = make_config(tmp_path, '++loss.reward_model=rm/LATEST/hf', loss='ppo')
    assert ppo.loss.params.reward_model == str(tmp_path / 'rm' / 'LATEST' / 'hf')
    elsewhere = make_config(tmp_path, '++loss.reward_model=elsewhere/rm', loss='ppo')  # not in cache_dir: as given
    assert elsewhere.loss.params.reward_model == 'elsewhere/rm'
