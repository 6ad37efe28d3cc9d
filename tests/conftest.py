import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end runs of train.py (still part of make test)')
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU, skipped without one (make gpu-check runs `pytest -m gpu`)')


@pytest.fixture(scope='session')
def tokenizer():
    import models
    return models.load_tokenizer('embedded:tiny-smollm2')
