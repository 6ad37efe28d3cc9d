"""An HTTP proxy in front of a real OpenAI-compatible server that injects faults into chat completions.

    with FaultProxy(upstream_base_url, fail_first=2, hang={4}, garbage_text={6}) as proxy:
        ... point the client at proxy.base_url ...
        proxy.chat_requests   # POST .../chat/completions received (faulty ones included)

Chat-completion requests are numbered from 1 in the order they arrive. A request can get:
- '500': HTTP 500 with an error body (the first `fail_first`, every `fail_every`-th, and those in `fail`);
- 'hang': no answer for `hang_seconds` (longer than the client's timeout), then the connection closes;
- 'garbage_text': HTTP 200 with a well-formed completion whose text names no response;
- 'empty': HTTP 200 with a well-formed completion whose content is null (a reasoning judge out of tokens);
- 'garbage_json': HTTP 200, Content-Type application/json, with a body that is not JSON;
- an HTTP error status of its own (`status={number: code}`, e.g. 401 or 404), with an OpenAI-style error body;
- 'die': the proxy stops listening and drops the connection, as a server that went away.
Everything else (and every other path, e.g. GET /v1/models) is forwarded to the upstream server, as are the
judge clients' probes for schema-constrained answers (halos.judge.PROBE_SCHEMA), uncounted (`probes` counts
them), so that a fault plan numbers the judgments alone. Without
an upstream (`upstream=None`) the proxy answers by itself: GET /v1/models lists one model and every chat
completion says "Response 1". `models_status` makes GET /v1/models answer with that HTTP status instead.
"""
import collections
import hashlib
import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Iterable, Optional

from halos.judge import PROBE_SCHEMA

GARBAGE_TEXT = 'banana bread is nice this time of year'


class FaultProxy:
    def __init__(self, upstream: Optional[str], fail_first: int = 0, fail_every: int = 0, fail: Iterable[int] = (),
                 hang: Iterable[int] = (), garbage_text: Iterable[int] = (), garbage_json: Iterable[int] = (),
                 empty: Iterable[int] = (),
                 hang_seconds: float = 10.0, status: Optional[Dict[int, int]] = None, die: Iterable[int] = (),
                 models_status: Optional[int] = None):
        parts = urllib.parse.urlsplit(upstream or 'http://local/v1')
        self.upstream_root = f'{parts.scheme}://{parts.netloc}' if upstream else None
        self.fail_first, self.fail_every, self.fail = fail_first, fail_every, set(fail)
        self.hang, self.garbage_text, self.garbage_json = set(hang), set(garbage_text), set(garbage_json)
        self.empty = set(empty)
        self.status, self.die, self.models_status = dict(status or {}), set(die), models_status
        self.hang_seconds = hang_seconds
        self.lock = threading.Lock()
        self.chat_requests = 0
        self.probes = 0
        self.faults = collections.Counter()
        self.answered = collections.Counter()  # request bodies (hashed) that got a real completion
        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), self._handler_class())
        self.server.daemon_threads = True
        self.base_url = f'http://127.0.0.1:{self.server.server_address[1]}{parts.path}'
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> 'FaultProxy':
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.server.socket.fileno() != -1:
            self.stop_listening()

    def stop_listening(self) -> None:
        """From now on connections are refused: the server is gone."""
        self.server.shutdown()
        self.server.server_close()

    def reset(self, **plan) -> None:
        """Zero the counters and replace the fault plan (keyword arguments as in the constructor)."""
        with self.lock:
            self.chat_requests = 0
            self.faults.clear()
            self.answered.clear()
            self.fail_first, self.fail_every = plan.get('fail_first', 0), plan.get('fail_every', 0)
            for name in ('fail', 'hang', 'garbage_text', 'garbage_json', 'empty', 'die'):
                setattr(self, name, set(plan.get(name, ())))
            self.status, self.models_status = dict(plan.get('status', {})), plan.get('models_status')

    def fault_for(self, number: int) -> Optional[str]:
        if number <= self.fail_first or number in self.fail or (self.fail_every and number % self.fail_every == 0):
            return '500'
        if number in self.status:
            return str(self.status[number])
        for name in ('hang', 'garbage_text', 'garbage_json', 'empty', 'die'):
            if number in getattr(self, name):
                return name
        return None

    def next_fault(self, path: str) -> Optional[str]:
        """Count a chat-completion request and decide its fault (None: forward it)."""
        if not path.endswith('/chat/completions'):
            return None
        with self.lock:
            self.chat_requests += 1
            fault = self.fault_for(self.chat_requests)
            if fault:
                self.faults[fault] += 1
            return fault

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                if proxy.models_status is not None:
                    self.reply(proxy.models_status, json.dumps(
                        {'data': []} if proxy.models_status == 200 else error_body(proxy.models_status)).encode())
                elif proxy.upstream_root is None:
                    self.reply(200, json.dumps({'object': 'list', 'data': [{'id': 'judge', 'object': 'model'}]}).encode())
                else:
                    self.forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                if is_probe(body):
                    with proxy.lock:
                        proxy.probes += 1
                    return self.forward(body, counted=False)
                fault = proxy.next_fault(self.path)
                if fault is None:
                    self.forward(body)
                elif fault.isdigit():
                    self.reply(int(fault), json.dumps(error_body(int(fault))).encode())
                elif fault == 'die':
                    threading.Thread(target=proxy.stop_listening, daemon=True).start()
                    self.close_connection = True
                elif fault == 'hang':
                    time.sleep(proxy.hang_seconds)
                    self.close_connection = True
                elif fault == 'garbage_text':
                    self.reply(200, json.dumps(completion(GARBAGE_TEXT)).encode())
                elif fault == 'empty':
                    self.reply(200, json.dumps(completion(None)).encode())
                else:
                    self.reply(200, b'{"id": "chatcmpl-1", "choices": [{"message": ')

            def forward(self, body: Optional[bytes], counted: bool = True):
                if proxy.upstream_root is None:
                    return self.reply(200, json.dumps(completion('Response 1')).encode())
                request = urllib.request.Request(proxy.upstream_root + self.path, data=body,
                                                 headers={'Content-Type': 'application/json'},
                                                 method='POST' if body is not None else 'GET')
                try:
                    with urllib.request.urlopen(request, timeout=300) as response:
                        status, content = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, content = error.code, error.read()
                if body is not None and status == 200 and counted:
                    with proxy.lock:
                        proxy.answered[hashlib.sha256(body).hexdigest()] += 1
                self.reply(status, content)

            def reply(self, status: int, content: bytes):
                try:
                    self.send_response(status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def is_probe(body: bytes) -> bool:
    """A judge client's request that asks whether the server constrains answers to a JSON schema."""
    response_format = json.loads(body or b'{}').get('response_format') or {}
    schema = response_format.get('schema') or response_format.get('json_schema', {}).get('schema')
    return schema == PROBE_SCHEMA


def error_body(status: int) -> dict:
    messages = {401: 'Incorrect API key provided', 404: 'The model does not exist', 500: 'injected server error'}
    return {'error': {'message': messages.get(status, f'injected HTTP {status}'), 'code': status}}


def completion(text: Optional[str]) -> dict:
    """A well-formed chat completion carrying `text`."""
    return {'id': 'chatcmpl-injected', 'object': 'chat.completion', 'created': int(time.time()), 'model': 'judge',
            'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': 'stop'}],
            'usage': {'prompt_tokens': 1, 'completion_tokens': 1, 'total_tokens': 2}}
