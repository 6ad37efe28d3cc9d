"""LoRA through peft: only the adapters train, the reference is the base model with the adapters off, the
merged export and the adapter directory give the adapted model's logits, resume is exact, and 2 processes
give what 1 process gives."""
import dataclasses
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import models
import train
from halos import lora
from halos.build import build_trainer
from halos.checkpoint import check_policy_file, load_policy_file
from halos.errors import ConfigError, DataError, MissingFileError
from helpers import ROOT, checked, make_config, run_train, train_command, train_in_process, whole_and_killed

LORA = ['++model.use_peft=true', '++model.peft.lora_r=4', '++model.peft.lora_alpha=8', '++model.peft.lora_dropout=0.0',
        '++optimizer=AdamW', '++lr=1e-2', '++warmup_steps=0', '++do_first_eval=false']


def named(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_the_adapters_train_and_the_reference_is_the_base_model(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *LORA, '++n_examples=8', loss='dpo'))
    assert isinstance(trainer.reference_model, lora.AdaptersOff) and not list(trainer.reference_model.parameters())
    before = named(trainer.policy)
    trainer.train()
    after = named(trainer.policy)
    adapters = [name for name in after if 'lora_' in name]
    assert adapters and all(trainer.policy.get_parameter(name).requires_grad for name in adapters)
    assert all(torch.equal(before[name], after[name]) for name in after if 'lora_' not in name)  # bit-identical
    assert all(not torch.equal(before[name], after[name]) for name in adapters if 'lora_B' in name)

    batch = trainer.eval_batches[0]
    base = models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval()
    with torch.no_grad():
        adapters_off = trainer.reference_logps(batch)
        separate = trainer.concatenated_logps(base, batch, trainer.prefixes)
        adapted = trainer.concatenated_logps(trainer.policy, batch, trainer.prefixes)
    for off, alone, on in zip(adapters_off, separate, adapted):
        torch.testing.assert_close(off, alone, atol=1e-5, rtol=0)
        assert (on - alone).abs().max() > 1e-3  # the adapters do change the policy


def test_the_merged_export_and_the_adapter_directory_give_the_adapted_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    train_in_process(tmp_path, *LORA, '++n_examples=8', loss='dpo', exp_name='lora')
    latest = tmp_path / 'lora' / 'LATEST'
    saved = load_policy_file(latest / 'policy.pt')['state']
    assert saved and all('lora_' in name for name in saved)  # only the trainable state
    assert os.path.getsize(latest / 'adapter' / 'adapter_model.safetensors') < os.path.getsize(latest / 'hf' / 'model.safetensors') / 4
    assert set(load_file(latest / 'adapter' / 'adapter_model.safetensors')) and (latest / 'adapter' / 'adapter_config.json').exists()

    base = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    adapted = PeftModel.from_pretrained(base, str(latest / 'adapter')).eval()
    trainer = build_trainer(make_config(tmp_path / 'resumed', *LORA, '++n_examples=8', loss='dpo'))
    trainer.load_checkpoint(str(latest))
    merged = AutoModelForCausalLM.from_pretrained(latest / 'hf').eval()
    input_ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        expected = trainer.policy.eval()(input_ids=input_ids).logits
        torch.testing.assert_close(adapted(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-4, rtol=0)
        assert (expected - models.load_causal_lm('embedded:tiny-smollm2', 'float32')(input_ids=input_ids).logits).abs().max() > 1e-3
    # eval.py's policy: the adapters beside a policy.pt merged into the base, or the merged export as given; a path
    # relative to cache_dir as load_from takes one
    import dataclasses

    import eval as eval_script
    run = make_config(tmp_path, *LORA, loss='dpo')
    for saved_policy in ('lora/LATEST/policy.pt', 'lora/LATEST/hf', str(latest / 'hf')):
        policy = eval_script.load_policy(dataclasses.replace(run, saved_policy=saved_policy), trainer.tokenizer)
        with torch.no_grad():
            torch.testing.assert_close(policy(input_ids=input_ids).logits, expected, atol=1e-4, rtol=0)


def test_resume_under_lora_ends_with_the_uninterrupted_adapters(tmp_path):
    overrides = [*LORA, '++n_epochs=2', '++eval_every=16', 'datasets=[hh_helpful]', '++warmup_steps=10']
    whole = build_trainer(make_config(tmp_path / 'whole', *overrides, loss='dpo'))
    save_checkpoint = whole.save_checkpoint

    def keep_first(final=False):
        save_checkpoint(final)
        if not (tmp_path / 'snapshot').exists():
            shutil.copytree(os.path.join(whole.run_dir, 'LATEST'), tmp_path / 'snapshot')
    whole.save_checkpoint = keep_first
    whole.train()
    resumed = build_trainer(make_config(tmp_path / 'resumed', *overrides, loss='dpo'))
    resumed.load_checkpoint(str(tmp_path / 'snapshot'))
    assert resumed.example_counter == 16 and len(resumed.optimizer.state_dict()['state']) > 0
    resumed.train()
    assert resumed.example_counter == whole.example_counter == 24
    for name, parameter in whole.policy.named_parameters():
        assert torch.equal(parameter, resumed.policy.get_parameter(name)), name


def test_lora_refuses_a_reference_that_must_move(tmp_path):
    with pytest.raises(ConfigError, match='humanline=true with model.use_peft=true'):
        make_config(tmp_path, *LORA, '++loss.humanline=true', loss='dpo')
    with pytest.raises(ConfigError, match='online.reference=previous with model.use_peft=true'):
        make_config(tmp_path, *LORA, '++online.rounds=1', '++online.reference=previous', loss='dpo')


def test_target_modules_that_match_nothing_name_the_linear_layers(tmp_path):
    with pytest.raises(ConfigError) as error:
        build_trainer(make_config(tmp_path, *LORA, '++model.peft.target_modules=[qproj,v_proj]', loss='sft'))
    assert str(error.value) == ("model.peft.target_modules: no module of the model that LoRA adapts (a linear, "
                                "embedding or convolution layer) is named qproj; its linear layers are down_proj, "
                                "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or give all-linear)")
    with pytest.raises(ConfigError, match=r'convolution layer\) is named \.\*attn\\\.q;'):
        build_trainer(make_config(tmp_path, *LORA, "++model.peft.target_modules='.*attn\\.q'", loss='sft'))
    with pytest.raises(ConfigError, match=r'convolution layer\) is named mlp;'):  # a block: peft adapts no block
        build_trainer(make_config(tmp_path, *LORA, '++model.peft.target_modules=[mlp]', loss='sft'))
    with pytest.raises(ConfigError, match=r'is named q_proj \(a lone string is a regular expression of the whole module '
                                          r'path: \[q_proj\] names the modules q_proj\); its linear layers are'):
        build_trainer(make_config(tmp_path, *LORA, '++model.peft.target_modules=q_proj', loss='sft'))
    regex = build_trainer(make_config(tmp_path, *LORA, "++model.peft.target_modules='.*self_attn\\.q_proj'", loss='sft'))
    assert sorted(lora.lora_layers(regex.policy)) == [f'base_model.model.model.layers.{i}.self_attn.q_proj'
                                                     for i in range(len(regex.policy.base_model.model.model.layers))]


def test_target_modules_that_hold_the_tied_embedding_weight_are_refused(tmp_path):
    """The tiny model, as SmolLM2, ties its output layer to its input embeddings: an adapter merged into the one
    shared weight would change both."""
    message = ("model.peft.target_modules names {}, whose weight the model shares between its input embeddings and its "
               "output layer (tie_word_embeddings): merged into the export, its adapter would change both; adapt other "
               "modules (its other linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj, "
               "or give all-linear)")
    for targets, named in [('[q_proj,lm_head]', 'lm_head'), ('[embed_tokens]', 'model.embed_tokens'),
                           ("'lm_head'", 'lm_head')]:
        with pytest.raises(ConfigError) as error:
            build_trainer(make_config(tmp_path, *LORA, f'++model.peft.target_modules={targets}', loss='sft'))
        assert str(error.value) == message.format(named)


def test_a_lora_dropout_of_1_is_refused_as_it_would_train_nothing(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, '++model.use_peft=true', '++model.peft.lora_dropout=1')
    assert str(error.value) == '++model.peft.lora_dropout=1: model.peft.lora_dropout must be a number in [0, 1)'


def test_adapters_of_another_model_size_are_refused_in_one_line(tmp_path):
    import transformers

    from halos.settings import PeftSettings
    tiny = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    adapted = lora.with_lora(tiny, lora.lora_config(PeftSettings(lora_r=4, lora_alpha=8), 'CAUSAL_LM', ()))
    adapted.save_pretrained(tmp_path / 'adapter')
    config = transformers.LlamaConfig(vocab_size=tiny.config.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    config._name_or_path = 'a smaller llama'
    with pytest.raises(ConfigError) as error:
        lora.with_lora(transformers.LlamaForCausalLM(config), None, str(tmp_path / 'adapter'))
    for directory, what in (('nowhere', 'is no directory'), ('', 'holds no adapter_config.json')):
        with pytest.raises(MissingFileError) as missing:
            lora.with_lora(tiny, None, str(tmp_path / directory))
        assert str(missing.value) == (f"model.load_lora_from='{tmp_path / directory}' {what} (give a run's "
                                      f"LATEST/adapter directory, or any directory PeftModel.save_pretrained wrote)")
    assert re.fullmatch(rf"model.load_lora_from='{tmp_path}/adapter': its adapters do not fit the model a smaller "
                        rf"llama: size mismatch for [\w.]+lora_A\.default\.weight: .* \(adapters of another model or "
                        rf"size\?\)", str(error.value))


@pytest.mark.slow
def test_two_processes_match_one_process_under_lora(tmp_path):
    common = [*LORA, '++n_examples=8', '++optimizer=SGD', '++lr=1.0', '++seed=1']
    two = subprocess.Popen(train_command(tmp_path, *common, loss='dpo', exp_name='two', nproc=2), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train.worker_main(make_config(tmp_path, *common, 'exp_name=one', loss='dpo'))
    stdout, stderr = two.communicate(timeout=600)
    checked(subprocess.CompletedProcess(two.args, two.returncode, stdout, stderr), two.args)
    one, two = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('one', 'two'))
    assert one['step_idx'] == two['step_idx'] == 8 and set(one['state']) == set(two['state'])
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-5), name
    assert one['metrics']['loss/eval'] == pytest.approx(two['metrics']['loss/eval'], abs=1e-5)


def test_lora_trains_under_bf16_autocast(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *LORA, '++n_examples=4', '++model.autocast_dtype=bfloat16', loss='dpo'))
    before = named(trainer.policy)
    loss = trainer.train_step([next(iter(trainer.train_iterator))])
    assert torch.isfinite(torch.tensor(loss))
    changed = [name for name, p in trainer.policy.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all('lora_' in name for name in changed)


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapters(tmp_path):
    common = [*LORA, '++n_epochs=2', '++eval_every=8', 'datasets=[hh_helpful]', '++warmup_steps=10']
    whole_and_killed(tmp_path, *common, max_delay=1.5)
    killed_at = load_policy_file(tmp_path / 'killed' / 'LATEST' / 'policy.pt')['step_idx']
    assert 0 < killed_at < 24, 'the run finished before it was killed'
    rerun = run_train(tmp_path, *common, '++resume=true', exp_name='killed')
    assert f'after {killed_at} examples' in rerun.stdout
    whole, resumed = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('whole', 'killed'))
    assert whole['step_idx'] == resumed['step_idx'] == 24 and set(whole['state']) == set(resumed['state'])
    for name, tensor in whole['state'].items():
        assert torch.allclose(tensor, resumed['state'][name], atol=1e-6), name


def test_an_empty_list_of_target_modules_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, '++model.use_peft=true', '++model.peft.target_modules=[]')
    assert str(error.value) == ("model.peft.target_modules=[]: give all-linear, or the names of the modules LoRA "
                                "adapts")


def test_a_lora_runs_policy_file_given_as_a_whole_model_is_named_with_what_to_give_instead(tmp_path):
    tiny = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    adapters_only = {'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight': torch.zeros(4, 64)}
    path = str(tmp_path / 'run' / 'LATEST' / 'policy.pt')
    says = f"{path} holds LoRA adapters (a run trained with model.use_peft=true), not a whole model: "
    continued = f"continue its adapters with model.use_peft=true model.load_lora_from={tmp_path}/run/LATEST/adapter"
    for ended, hint in [(False, f"its run has not written its merged model yet ({tmp_path}/run/LATEST/hf, at its "
                                f"final save): "), (True, f"give its merged model, {tmp_path}/run/LATEST/hf, or ")]:
        if ended:
            (tmp_path / 'run' / 'LATEST' / 'hf').mkdir(parents=True)
        with pytest.raises(ConfigError) as error:
            models.load_state_into(tiny, adapters_only, path)
        assert str(error.value) == says + hint + continued
    from halos.checkpoint import start_from_lora_run
    assert start_from_lora_run(str(tmp_path / 'run')) == f'++model.load_from={tmp_path}/run/LATEST/hf'
    assert start_from_lora_run(str(tmp_path / 'other')) == \
        f'++model.use_peft=true ++model.load_lora_from={tmp_path}/other/LATEST/adapter'


def test_a_reward_models_adapters_are_refused_as_a_policys_and_a_policys_as_a_reward_models(tmp_path):
    adapters = tmp_path / 'rm' / 'LATEST' / 'adapter'
    adapters.mkdir(parents=True)
    (adapters / 'adapter_config.json').write_text(json.dumps({'task_type': 'SEQ_CLS', 'peft_type': 'LORA'}))
    tiny = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    with pytest.raises(ConfigError) as error:
        lora.with_lora(tiny, None, str(adapters), 'saved_policy')
    assert str(error.value) == (
        f"saved_policy='{adapters}' holds the adapters of a reward model (loss=bradley-terry), not of a policy "
        f"(their adapter_config.json's task_type is SEQ_CLS); label.py --reward-model <its run>/LATEST/hf scores "
        f"samples with it")
    (adapters / 'adapter_config.json').write_text(json.dumps({'task_type': 'CAUSAL_LM', 'peft_type': 'LORA'}))
    settings = make_config(tmp_path, *LORA, loss='bradley-terry').model.peft
    with pytest.raises(ConfigError, match=r"holds the adapters of a policy, not of a reward model \(loss=bradley-terry"):
        lora.with_lora(tiny, lora.lora_config(settings, 'SEQ_CLS', ('score',)), str(adapters))


def test_eval_merges_the_adapters_beside_a_lora_runs_policy_file_and_reads_any_other_as_a_whole_model(tmp_path):
    import importlib
    eval_script = importlib.import_module('eval')
    lora_run, whole_run = tmp_path / 'lora' / 'LATEST', tmp_path / 'whole' / 'LATEST'
    for directory in (lora_run / 'adapter', whole_run):
        directory.mkdir(parents=True)
    (lora_run / 'policy.pt').write_bytes(b'')
    (whole_run / 'policy.pt').write_bytes(b'')
    run = make_config(tmp_path, *LORA, loss='sft')
    assert eval_script.saved_lora_adapters(dataclasses.replace(run, saved_policy=str(lora_run / 'policy.pt'))) == \
        str(lora_run / 'adapter')
    assert eval_script.saved_lora_adapters(dataclasses.replace(run, saved_policy=str(whole_run / 'policy.pt'))) is None
    assert eval_script.saved_lora_adapters(dataclasses.replace(run, saved_policy=str(whole_run))) is None


def test_continued_adapters_with_a_reference_warn_that_the_reference_lacks_them(tmp_path, capsys):
    adapter = str(tmp_path / 'sft' / 'LATEST' / 'adapter')
    make_config(tmp_path, '++model.use_peft=true', f'++model.load_lora_from={adapter}', loss='dpo')
    assert capsys.readouterr().out.strip() == (
        f"warning: the reference model is the policy with its adapters off, the base model embedded:tiny-smollm2, "
        f"not the policy that the adapters of model.load_lora_from={adapter} make: to keep that policy as the "
        f"reference, train fresh adapters on its merged model (++model.load_from=<its run>/LATEST/hf without "
        f"model.load_lora_from)")
    make_config(tmp_path, '++model.use_peft=true', f'++model.load_lora_from={adapter}', loss='sft')
    assert 'reference' not in capsys.readouterr().out


def test_saved_adapters_are_found_relative_to_cache_dir_as_load_from_is(tmp_path, monkeypatch):
    (tmp_path / 'cache' / 'sft' / 'LATEST' / 'adapter').mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # elsewhere than cache_dir
    run = make_config(tmp_path / 'cache', '++model.use_peft=true', '++model.load_lora_from=sft/LATEST/adapter',
                      loss='sft')
    assert run.model.load_lora_from == str(tmp_path / 'cache' / 'sft' / 'LATEST' / 'adapter')


def test_a_lora_run_or_its_adapters_given_as_a_whole_model_name_the_merged_model(tmp_path):
    latest = tmp_path / 'run' / 'LATEST'
    (latest / 'adapter').mkdir(parents=True)
    (latest / 'policy.pt').write_bytes(b'')
    (latest / 'adapter' / 'adapter_config.json').write_text('{}')
    with pytest.raises(DataError) as error:
        check_policy_file(str(tmp_path / 'run'), 'model.load_from')
    assert str(error.value) == (f"model.load_from={tmp_path}/run: a run directory; give its checkpoint, "
                                f"model.load_from={latest}/hf (its merged model, which its final save writes)")
    with pytest.raises(DataError) as error:
        check_policy_file(str(latest / 'adapter'), 'saved_policy')
    assert str(error.value) == (f"saved_policy={latest}/adapter: LoRA adapters, not a whole model; give the merged "
                                f"model that their run saves beside them, saved_policy={latest}/hf")
