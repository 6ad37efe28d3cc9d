"""Online PPO: the KL-penalised per-token reward and the adaptive KL controller by hand, rollout rows, and
a step that follows the score, train.py end to end and a killed run that resumes to the same policy."""
import json
import os

import pytest
import torch

from halos import batch as schema, rl
from halos.build import build_trainer
from halos.checkpoint import load_policy_file
from helpers import DATA, ROOT, make_config, run_train, tiny_reward_model, train_in_process, whole_and_killed
from trainers import adaptive_kl_coef, kl_penalised_rewards
from utils import get_batch_logps

REWARD = os.path.join(ROOT, 'tests', 'rewards.py')
PROMPTS = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')


def test_kl_penalised_rewards_by_hand():
    mask = torch.tensor([[0.0, 1, 1, 1], [0, 1, 1, 0]])
    old = torch.tensor([[0.0, -0.9, -2.2, -0.4], [0, -1.6, -0.5, 0]])
    reference = torch.tensor([[0.0, -1, -2, -0.5], [0, -1.5, -0.7, 0]])
    score_rewards = rl.rewards_on_last_token(torch.tensor([2.0, -1.0]), mask)
    rewards, kl = kl_penalised_rewards(score_rewards, old, reference, mask, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.1, -0.2, 0.1], [0, -0.1, 0.2, 0]]))
    # r_t = -0.5 KL_t, plus the score on the last completion token (row 0: t=3, row 1: t=2)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 1.95], [0, 0.05, -1.1, 0]]))


@pytest.mark.parametrize('kl, expected', [(9.0, 0.2 * (1 + 0.2 * 100 / 10000)),     # error 0.5, clipped to 0.2
                                          (5.4, 0.2 * (1 - 0.1 * 100 / 10000)),     # error -0.1
                                          (0.0, 0.2 * (1 - 0.2 * 100 / 10000))])    # error -1, clipped to -0.2
def test_adaptive_kl_controller_moves_towards_the_target_with_a_clipped_error(kl, expected):
    assert adaptive_kl_coef(0.2, kl, target=6.0, horizon=10000, n_rows=100) == pytest.approx(expected, abs=1e-12)


def test_rollout_rows_join_unpadded_prompts_and_completions():
    rows = rl.rollout_sequences(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
                                [[1, 2, 3], [4]], pad_token_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 1, 2, 3], [7, 8, 9, 4, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rows.labels.tolist() == [[-100, -100, 1, 2, 3], [-100, -100, -100, 4, -100]]


def four_prompts(tmp_path):
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(open(PROMPTS).readlines()[:4]))
    return path


def ppo_overrides(prompts, n_examples, *extra):
    """Top-4 sampling, so that a 10-token sample of the tiny random model can change within a few steps."""
    return [f'datasets=[{prompts}]', f'++loss.reward_function={REWARD}:vowels', '++max_new_tokens=10', '++top_k=4',
            f'++n_examples={n_examples}', '++n_epochs=null', '++model.batch_size=4', '++lr=1e-2', '++optimizer=AdamW',
            '++do_first_eval=false', '++n_eval_examples=4', *extra]


def step_metrics(run_dir, name):
    return [record[name] for record in map(json.loads, open(os.path.join(run_dir, 'metrics.jsonl'))) if name in record]


def sample_logps(trainer, part):
    """[rows] summed completion log-probs of the experience's samples under the current policy."""
    with torch.no_grad():
        outputs, _ = trainer.policy_outputs(part.input_ids, part.attention_mask)
        return (get_batch_logps(outputs.logits, part.labels, token_level=True) * part.mask).sum(-1)


def test_an_online_ppo_step_moves_probability_towards_the_better_scored_samples(tmp_path):
    """One step (sample, score, 4 PPO epochs) moves the samples' log-probabilities with their scores: up for the
    best-scored, down for the worst, positively correlated over the batch. Measured on the step's own samples,
    because the score-per-step curve of the tiny random model under top-k sampling is too noisy to assert on
    (a few logits' order decides its top 4 tokens, so small updates reshuffle what it samples)."""
    trainer = build_trainer(make_config(tmp_path, *ppo_overrides(four_prompts(tmp_path), 4), loss='ppo-online'))
    batch = next(iter(trainer.train_iterator))
    experience, metrics = trainer.experience([batch])
    part = experience[0].trimmed()
    before = sample_logps(trainer, part)
    trainer.optimize(experience, metrics, batch[schema.PROMPT_TEXT][0])
    moved = sample_logps(trainer, part) - before
    scores = metrics['rewards/score']
    assert len(set(scores.tolist())) > 1, f'the four samples scored alike ({scores.tolist()}): nothing to follow'
    centered = scores - scores.mean()
    assert (centered * moved).sum() > 0, (scores.tolist(), moved.tolist())
    assert moved[scores == scores.max()].mean() > 0 > moved[scores == scores.min()].mean(), (scores.tolist(), moved.tolist())


def test_several_reward_functions_log_each_part_of_the_score(tmp_path):
    """loss.reward_function as a list: the score is the sum, and each function's score is logged as its part."""
    overrides = [o for o in ppo_overrides(four_prompts(tmp_path), 4) if not o.startswith('++loss.reward_function')]
    trainer = build_trainer(make_config(tmp_path, *overrides, f'++loss.reward_function=[{REWARD}:vowels,'
                                                              f'{REWARD}:characters]', loss='ppo-online'))
    batch = next(iter(trainer.train_iterator))
    _, metrics = trainer.experience([batch])
    vowels, characters = metrics['reward_parts/vowels'], metrics['reward_parts/characters']
    assert len(vowels) == len(characters) == 4 and characters.min() > 0
    torch.testing.assert_close(metrics['rewards/score'], vowels + characters)
    named = trainer.named_for('eval', metrics)
    assert {'reward_parts_eval/vowels', 'reward_parts_eval/characters', 'rewards_eval/score'} <= set(named)


@pytest.mark.slow
def test_online_ppo_trains_end_to_end_with_the_kl_controller(tmp_path):
    """train.py: a score and a KL per step, the KL grows from 0 (the policy starts as the reference) and the
    adaptive controller moves the coefficient."""
    prompts = four_prompts(tmp_path)
    train_in_process(tmp_path, *ppo_overrides(prompts, 4 * 16, '++eval_every=1000'), loss='ppo-online',
                     exp_name='ppo')
    scores, kls = step_metrics(tmp_path / 'ppo', 'rewards/score'), step_metrics(tmp_path / 'ppo', 'objective/kl')
    kl_coefs = step_metrics(tmp_path / 'ppo', 'objective/kl_coef')
    assert len(scores) == len(kls) == 16 and all(0 <= score <= 60 for score in scores)  # vowels in 10 tokens
    assert abs(kls[0]) < 1e-4 and sum(kls[-4:]) / 4 > 0.5, kls
    assert kl_coefs[0] == pytest.approx(0.2) and kl_coefs[-1] != kl_coefs[0]


@pytest.mark.slow
def test_online_ppo_killed_and_resumed_ends_with_the_same_policy(tmp_path):
    prompts = four_prompts(tmp_path)
    overrides = ppo_overrides(prompts, 4 * 8, '++eval_every=8')
    whole_and_killed(tmp_path, *overrides, loss='ppo-online', max_delay=0.3)
    state = tmp_path / 'killed' / 'LATEST' / 'trainer_state.pt'
    saved = torch.load(state, weights_only=True)
    assert 0 < saved['example_counter'] < 32, 'the run was not killed between its first checkpoint and its end'

    rerun = run_train(tmp_path, *overrides, '++resume=true', loss='ppo-online', exp_name='killed')
    assert 'resumed from' in rerun.stdout
    one, two = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('whole', 'killed'))
    assert one['step_idx'] == two['step_idx'] == 32
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-6), name
    states = [torch.load(tmp_path / name / 'LATEST' / 'trainer_state.pt', weights_only=True) for name in ('whole', 'killed')]
    assert states[0]['kl_coef'] == pytest.approx(states[1]['kl_coef'], rel=1e-6) and states[0]['kl_coef'] != 0.2


def test_a_reward_model_scores_each_sample_as_the_reward_model_labeller_does(tmp_path):
    from halos.labelers import RewardModelLabeler
    tiny_reward_model(tmp_path / 'rm')
    overrides = [o for o in ppo_overrides(four_prompts(tmp_path), 4) if not o.startswith('++loss.reward_function')]
    trainer = build_trainer(make_config(tmp_path, *overrides, f'++loss.reward_model={tmp_path / "rm"}',
                                        loss='ppo-online'))
    seen = []
    score = trainer.reward_model.__call__
    trainer.reward_model = lambda prompts, completions, extras: (seen.append((prompts, completions))
                                                                 or score(prompts, completions, extras))
    batch = next(iter(trainer.train_iterator))
    rollout = trainer.rollout(batch)
    (prompts, completions), = seen
    assert prompts == batch[schema.PROMPT_AS_GIVEN] == [t[0]['content'] for t in batch[schema.PROMPT_TURNS]]
    assert len(completions) == 4
    expected = RewardModelLabeler(str(tmp_path / 'rm'))(prompts, completions, [{}] * len(prompts))
    assert rollout.metrics['rewards/score'].tolist() == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 6) for s in expected}) > 1


def test_a_bad_score_names_a_training_sample_by_its_step_and_a_held_out_one_as_held_out(tmp_path):
    from halos.labelers import LabelError
    (tmp_path / 'none.py').write_text('def reward(prompt, completion):\n    return None\n')
    overrides = [o for o in ppo_overrides(four_prompts(tmp_path), 4) if not o.startswith('++loss.reward_function')]
    trainer = build_trainer(make_config(tmp_path, *overrides, f'++loss.reward_function={tmp_path}/none.py:reward',
                                        loss='ppo-online'))
    batch = next(iter(trainer.train_iterator))
    for training, named in ((True, 'step 0 prompt'), (False, 'held-out prompt')):
        trainer.policy.train(training)
        with pytest.raises(LabelError) as error:
            trainer.experience([batch])
        assert f"gave None for {named} {batch[schema.PROMPT_ID][0]}" in str(error.value)


def test_online_ppo_names_its_own_reward_keys_where_an_online_labeller_is_given(tmp_path):
    from halos.errors import ConfigError
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, f'++online.reward_function={REWARD}:vowels', loss='ppo-online')
    assert str(error.value).endswith(
        "loss=ppo-online scores its samples with one of loss.reward_function=file.py:function or loss.reward_model="
        "<sequence classifier>: give exactly one (online.reward_function and online.reward_model are the labellers "
        "of online rounds, which it does not read)")
