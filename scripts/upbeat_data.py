"""Offline preference data for the upbeat task, from the embedded model's own samples: k samples of every
train prompt (SmolLM2-135M-Instruct with its chat template), scored by data/upbeat/reward.py, written as

    data/upbeat/samples.jsonl   the scored samples (HALOs sample records with `reward`)
    data/upbeat/pairs.jsonl     pairwise feedback: the best vs the worst sample of each prompt (ties dropped)
    data/upbeat/binary.jsonl    binary feedback: desirable when the reward is at least the prompt's median
    data/upbeat/scalar.jsonl    every sample with its reward (GRPO)

so that offline losses train on the same task, labels and budget as the online ones.

    python scripts/upbeat_data.py [--samples-per-prompt 4] [--max-new-tokens 48] [--temperature 0.7] [--out DIR]

--out writes the four files elsewhere (the default rewrites the shipped ones).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
UPBEAT = os.path.join(ROOT, 'data', 'upbeat')


def main() -> None:
    from halos.errors import ArgumentParser, positive_int, positive_number, reported_as_one_line
    parser = ArgumentParser(prog='upbeat_data.py', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--samples-per-prompt', type=positive_int, default=4)
    parser.add_argument('--max-new-tokens', type=positive_int, default=48)
    parser.add_argument('--temperature', type=positive_number, default=0.7)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=UPBEAT, help='the directory the files are written to')
    args = parser.parse_args()
    with reported_as_one_line('upbeat_data.py'):
        write_data(args)


def write_data(args) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    import dataloader
    import models
    from halos.jsonl import write_jsonl
    from halos.labelers import RewardFunctionLabeler
    from halos.labelling import build_feedback, label_samples
    from halos.sampling import SamplingOptions, halos_sampler, sample_records

    name = 'embedded:smollm2-135m-instruct'
    tokenizer = models.load_tokenizer(name)
    policy = models.load_causal_lm(name, 'float32').eval()
    prompts = dataloader.PromptDataLoader([os.path.join(UPBEAT, 'train_prompts.jsonl')], tokenizer, split='train',
                                          batch_size=8, n_epochs=1, max_length=512, max_prompt_length=256,
                                          use_chat_template=True, seed=args.seed)
    options = SamplingOptions(512, top_p=0.95, temperature=args.temperature, top_k=0,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    torch.manual_seed(args.seed)
    samples = sample_records(halos_sampler(policy, tokenizer, options), prompts, args.samples_per_prompt,
                             'smollm2-135m-instruct')
    labelled, counts = label_samples(samples, RewardFunctionLabeler(os.path.join(UPBEAT, 'reward.py') + ':reward'))
    outputs = {'samples': labelled, 'pairs': build_feedback(labelled, 'pairwise', pair_mode='max', seed=args.seed),
               'binary': build_feedback(labelled, 'binary', threshold='median', per_prompt=True),
               'scalar': build_feedback(labelled, 'scalar')}
    check_learnable(labelled, outputs)
    for kind, records in outputs.items():
        write_jsonl(os.path.join(args.out, f'{kind}.jsonl'), records)
        print(f'{kind}: {len(records)} records')
    print(dict(counts))


def check_learnable(labelled, outputs) -> None:
    """Every feedback file has something to learn from, or none is written: a degenerate one (too few or too
    short samples) would replace a shipped file."""
    from halos.errors import DataError
    from halos.labelling import why_no_training_data
    for name, kind in (('pairs', 'pairwise'), ('binary', 'binary'), ('scalar', 'scalar')):
        reason = why_no_training_data(labelled, outputs[name], kind)
        if reason:
            raise DataError(f"{name}: {reason}; nothing written (sample more per prompt, longer or at a higher "
                            f"temperature)")


if __name__ == '__main__':
    main()
