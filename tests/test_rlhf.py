"""The classic RLHF pipeline's parts: a Bradley-Terry reward model that reaches accuracy 1 on a repeated
batch and exports an AutoModelForSequenceClassification directory that scores as the trainer did, the
reward-model labeler on that export, and online PPO against a reward."""
import json
import os

import pytest
import torch

from halos.build import build_trainer
from halos.checkpoint import load_policy_file
from helpers import make_config, tiny_reward_model, train_in_process


def test_reward_model_accuracy_rises_to_one_on_a_repeated_batch(tmp_path):
    trainer = build_trainer(make_config(tmp_path, '++n_examples=8', '++lr=3e-3', '++optimizer=Adam',
                                        '++warmup_steps=0', loss='bradley-terry'))
    batch = next(iter(trainer.train_iterator))
    accuracy = lambda: trainer.get_batch_metrics(batch, 'train')[1]['rewards_train/accuracies'].mean().item()
    with torch.no_grad():
        before = accuracy()
    for _ in range(10):
        trainer.train_step([batch])
    with torch.no_grad():
        after = accuracy()
    assert after == 1.0 and after > before


@pytest.mark.slow
def test_the_exported_reward_model_scores_like_the_trainer_and_the_labeler(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from halos.labelers import RewardModelLabeler
    train_in_process(tmp_path, '++n_examples=8', '++lr=1e-3', '++optimizer=Adam', loss='bradley-terry', exp_name='rm')
    run_dir = tmp_path / 'rm'
    saved = load_policy_file(run_dir / 'LATEST' / 'policy.pt')
    assert 'score.weight' in saved['state'] and 'rewards_eval/accuracies' in saved['metrics']
    exported = AutoModelForSequenceClassification.from_pretrained(run_dir / 'LATEST' / 'hf').eval()
    recorded = json.load(open(run_dir / 'LATEST' / 'hf' / 'halos_reward_model.json'))
    assert recorded['use_chat_template'] is False
    # its training length is every labeller's cut, unless one is given
    length = make_config(tmp_path, loss='bradley-terry').model.max_length
    assert recorded['max_length'] == RewardModelLabeler(str(run_dir / 'LATEST' / 'hf')).max_length == length

    trainer = build_trainer(make_config(tmp_path / 'again', f'++model.load_from={run_dir / "LATEST" / "policy.pt"}',
                                        loss='bradley-terry'))
    batch = trainer.eval_batches[0]
    with torch.no_grad():
        _, metrics = trainer.get_batch_metrics(batch, 'eval')
        scores = [exported(input_ids=ids[mask.bool()].unsqueeze(0)).logits[0, 0].item()
                  for ids, mask in zip(batch['chosen_combined_input_ids'], batch['chosen_combined_attention_mask'])]
    assert metrics['rewards_eval/chosen'].tolist() == pytest.approx(scores, abs=1e-5)
    assert len({round(s, 5) for s in scores}) > 1

    # The labeler tokenizes a prompt and a completion as the training pairs were, so it gives the same scores.
    example = next(iter(trainer.eval_iterator.full_data.values()))
    chosen = example.generations[example.pairs[0][0]]
    labeler = RewardModelLabeler(str(run_dir / 'LATEST' / 'hf'))
    element = trainer.eval_iterator.tokenize_element(example, example.prompt, {'chosen': chosen})
    with torch.no_grad():
        expected = exported(input_ids=torch.tensor([element['chosen_combined_input_ids']])).logits[0, 0].item()
    assert labeler([example.turns], [chosen], [{}])[0] == pytest.approx(expected, abs=1e-5)


def test_a_causal_lm_given_as_the_reward_model_is_refused_not_scored_by_a_random_head(tmp_path):
    import transformers

    import models
    from halos.errors import ConfigError
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / 'lm')
    tokenizer.save_pretrained(tmp_path / 'lm')
    with pytest.raises(ConfigError) as error:
        models.load_reward_model(str(tmp_path / 'lm'), 'float32')
    assert str(error.value) == (f"reward model '{tmp_path / 'lm'}' is not a sequence classifier: its weights lack "
                                f"score.weight (a causal LM? a reward model is an HF ...ForSequenceClassification, "
                                f"such as a loss=bradley-terry run's LATEST/hf)")


def test_a_classifier_of_three_classes_given_as_the_reward_model_is_refused(tmp_path):
    """Which of its logits is the reward is a guess; one logit or HALOs' two are read."""
    import transformers

    import models
    from halos.errors import ConfigError
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      num_labels=3, pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / 'sentiment')
    tokenizer.save_pretrained(tmp_path / 'sentiment')
    with pytest.raises(ConfigError) as error:
        models.load_reward_model(str(tmp_path / 'sentiment'), 'float32')
    assert str(error.value) == (f"reward model '{tmp_path / 'sentiment'}' is a classifier of 3 classes: a reward model "
                                f"gives one logit (or two, in HALOs' convention, whose second is the score)")


def test_a_reward_models_checkpoint_given_as_a_policy_is_named_as_one():
    import models
    from halos.errors import ConfigError
    policy = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    classifier = models.load_sequence_classifier('embedded:tiny-smollm2', 'float32')
    with pytest.raises(ConfigError) as error:
        models.load_state_into(policy, classifier.state_dict(), 'rm/LATEST/policy.pt')
    assert str(error.value) == ("rm/LATEST/policy.pt is a reward model's checkpoint (a score head and no lm_head, as "
                                "loss=bradley-terry saves), not a policy's: it does not generate; label.py "
                                "--reward-model <its run>/LATEST/hf scores samples with it")
    models.load_state_into(classifier, policy.state_dict(), 'sft/LATEST/policy.pt')  # a policy starts a reward model


def test_a_reward_models_export_given_as_a_policy_is_named_as_one(tmp_path):
    import models
    from halos.errors import ConfigError
    models.load_sequence_classifier('embedded:tiny-smollm2', 'float32').save_pretrained(tmp_path / 'rm')
    with pytest.raises(ConfigError) as error:
        models.load_causal_lm('embedded:tiny-smollm2', 'float32', load_from=str(tmp_path / 'rm'))
    assert str(error.value) == (f"{tmp_path}/rm is a reward model (a sequence classifier, as loss=bradley-terry "
                                f"exports), not a policy: it does not generate; label.py --reward-model {tmp_path}/rm "
                                f"scores samples with it")
    reward_model = models.load_sequence_classifier('embedded:tiny-smollm2', 'float32', load_from=str(tmp_path / 'rm'))
    assert reward_model.config.architectures == ['LlamaForSequenceClassification']  # as a reward model it loads


def test_a_chat_template_reward_model_whose_tokenizer_lost_its_template_is_named(tmp_path):
    import models
    from halos.errors import ConfigError
    from halos.labelers import RewardModelLabeler
    tiny_reward_model(tmp_path / 'rm')
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    tokenizer.chat_template = None
    for name in os.listdir(tmp_path / 'rm'):
        if name.startswith(('tokenizer', 'chat_template', 'special_tokens')):
            os.remove(tmp_path / 'rm' / name)
    tokenizer.save_pretrained(tmp_path / 'rm')
    (tmp_path / 'rm' / 'halos_reward_model.json').write_text(json.dumps(
        {'use_chat_template': True, 'human_prefix': '', 'human_suffix': '', 'assistant_prefix': '', 'assistant_suffix': ''}))
    with pytest.raises(ConfigError) as error:
        RewardModelLabeler(str(tmp_path / 'rm'))
    assert str(error.value) == (f"reward model '{tmp_path / 'rm'}' was trained on chat-template text "
                                f"(halos_reward_model.json says use_chat_template: true), but its tokenizer has no chat "
                                f"template: restore its tokenizer files from the run's LATEST/hf export")


def test_a_reward_model_warns_once_that_it_cuts_an_input_longer_than_its_max_length(tmp_path, capsys):
    from halos.labelers import RewardModelLabeler
    labeler = RewardModelLabeler(tiny_reward_model(tmp_path / 'rm'), max_length=4)
    long = 'one two three four five six seven'
    assert len(labeler.token_ids('Hi.', long)) == 4
    capsys.readouterr()
    labeler.warned_of_cuts = False
    labeler(['Hi.', 'Yo.'], [long, long + ' eight'], [{}, {}])
    n_tokens = len(RewardModelLabeler(str(tmp_path / 'rm'), max_length=256).token_ids('Hi.', long))
    assert capsys.readouterr().out == (f"warning: reward model {tmp_path / 'rm'}: an input of {n_tokens} tokens is "
                                       f"longer than max_length=4, so it is scored on its last 4 (as is any other that "
                                       f"long): its prompt's start is cut, or the start of its completion too\n")
    assert RewardModelLabeler(str(tmp_path / 'rm'), max_length=64)(['Hi.'], [long], [{}]) and \
        capsys.readouterr().out == ''
