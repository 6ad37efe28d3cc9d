"""Talking to an LLM judge behind any OpenAI-compatible API, shared by compare.py (head-to-head verdicts) and
the LLM-judge labeler (pointwise scores): the client with timeouts and retries, answers constrained to a JSON
schema where the server can do it, a concurrent request pool with pacing, the errors that end a run, and an
append-only cache of judgments.

A server that constrains answers to a JSON schema (OpenAI, vLLM: response_format json_schema; llama.cpp's
server: json_object with a schema; halos' own judge_server.scoring_judge_server) is found once per server and
judge by a probe request; its verdicts cannot be unparseable. Elsewhere the answer is parsed as text.

The API key is read from OPENAI_API_KEY only and never written anywhere; servers other than OpenAI's get a
placeholder key.
"""
import hashlib
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional

import openai
from tqdm import tqdm

from halos.errors import DataError, UserError, describe_error
from halos.jsonl import complete_lines, drop_cut_last_line

OPENAI_BASE_URL = 'https://api.openai.com/v1'
# the HTTP client logs every request, and the OpenAI client every retry, at INFO: under train.py's logging (Hydra's,
# INFO) a judged round would print a line per judgment; the judge's own progress bar and errors say what matters.
# OPENAI_LOG=info or debug, the OpenAI client's own switch, still shows them.
if not os.environ.get('OPENAI_LOG'):
    logging.getLogger('httpx').setLevel(logging.WARNING)
    logging.getLogger('openai').setLevel(logging.WARNING)
NO_KEY = 'sk-no-key-required'  # servers such as vLLM, llama.cpp and Ollama accept any key
# Refusals that every other request would get too: stop the run (what is cached stays).
FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class JudgeError(UserError):
    """The judge cannot be reached or refuses every request; the message says what to check."""


def public_url(url: str) -> str:
    """The URL without user info, query or fragment (which could carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return url
    host = parts.hostname + (f':{parts.port}' if parts.port else '')
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, '', ''))


def api_key_for(base_url: str) -> str:
    """OPENAI_API_KEY; a placeholder for servers other than OpenAI's, which mostly need none."""
    key = os.environ.get('OPENAI_API_KEY')
    if key:
        return key
    if urllib.parse.urlsplit(base_url).hostname == 'api.openai.com':
        raise JudgeError("judging with OpenAI needs an API key: export OPENAI_API_KEY=... (it is read from the "
                         "environment only), or point --base-url at a local server such as http://127.0.0.1:8000/v1")
    return NO_KEY


def server_url(base_url: Optional[str]) -> str:
    """The judge server: the one given, else OPENAI_BASE_URL from the environment, else OpenAI."""
    return base_url or os.environ.get('OPENAI_BASE_URL') or OPENAI_BASE_URL


def checked_url(base_url: str) -> str:
    """A server's URL with its scheme (without one, the client finds nothing there, whatever listens)."""
    if not base_url.startswith(('http://', 'https://')):
        raise JudgeError(f"judge server URL {public_url(base_url)} has no http:// or https:// (give it as "
                         f"http://{public_url(base_url)})")
    return base_url


def make_client(base_url: str, timeout: float, max_retries: int) -> openai.OpenAI:
    checked_url(base_url)
    return openai.OpenAI(api_key=api_key_for(base_url), base_url=base_url, timeout=timeout, max_retries=max_retries)


def check_reachable(client: openai.OpenAI, base_url: str) -> None:
    """Fail at once, with what to do, when nothing listens at the base URL."""
    try:
        client.with_options(max_retries=1, timeout=10).models.list()
    except openai.APITimeoutError:
        return  # something listens; the requests themselves will retry
    except openai.APIConnectionError:
        raise JudgeError(
            f"no judge server reachable at {public_url(base_url)}: start one (python -m llama_cpp.server --model "
            f"M.gguf, vllm serve M, or ollama serve) and pass its URL (--base-url; online.base_url in training), "
            f"or unset OPENAI_BASE_URL to use OpenAI") from None
    except openai.AuthenticationError:
        raise JudgeError(f"the judge server at {public_url(base_url)} rejected the API key: "
                         f"check OPENAI_API_KEY") from None
    except openai.APIStatusError:
        return  # e.g. a server without GET /models


class RequestPacer:
    """Spaces the starts of requests at least `interval` seconds apart, across all threads."""

    def __init__(self, interval: float):
        self.interval = interval
        self.lock = threading.Lock()
        self.next_start = 0.0

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(start - now)


RESPONSE_FORMATS = {
    'json_schema': lambda schema: {'type': 'json_schema', 'json_schema': {'name': 'answer', 'schema': schema,
                                                                          'strict': True}},
    'json_object': lambda schema: {'type': 'json_object', 'schema': schema},  # llama.cpp's server
}
CONSTRAINED_ANSWER_TOKENS = 32
PROBE_SCHEMA = {'type': 'object', 'properties': {'answer': {'type': 'string', 'enum': ['yes']}},
                'required': ['answer'], 'additionalProperties': False}
constraining_formats: Dict[tuple, Optional[str]] = {}  # (server, judge) -> the form it honours, None: neither


def constrained(client: openai.OpenAI, base_url: str, model: str, schema: dict) -> Optional[dict]:
    """The response_format that makes the server constrain `model`'s answers to `schema`, or None when it does
    not (the answer is then parsed as text). Found once per server and judge by a probe, then cached."""
    key = (public_url(base_url), model)
    if key not in constraining_formats:
        constraining_formats[key] = next((form for form, build in RESPONSE_FORMATS.items()
                                          if honours(client, model, build(PROBE_SCHEMA))), None)
    form = constraining_formats[key]
    return RESPONSE_FORMATS[form](schema) if form else None


def honours(client: openai.OpenAI, model: str, response_format: dict) -> bool:
    """Whether the server answers a probe with the one instance of PROBE_SCHEMA under `response_format` (a server
    that rejects the format, or ignores it and answers in words, does not)."""
    try:
        answer = ask(client.with_options(max_retries=0), model, [{'role': 'user', 'content': 'Answer yes.'}], 16, 0,
                     response_format)
    except (openai.APIStatusError, openai.APITimeoutError, ValueError):
        return False
    try:
        return json.loads(answer) == {'answer': 'yes'}
    except json.JSONDecodeError:
        return False


def json_field(answer: str, field: str):
    """The value of `field` in an answer that is a JSON object (a schema-constrained one), else None."""
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return None
    return value.get(field) if isinstance(value, dict) else None


def ask(client: openai.OpenAI, model: str, messages: List[dict], max_tokens: int, seed: int,
        response_format: Optional[dict] = None) -> str:
    """The judge's answer at temperature 0 (constrained by `response_format` when given); the client retries
    timeouts, rate limits, connection errors and 5xx."""
    constraint = {'response_format': response_format} if response_format else {}
    if response_format:  # room for the JSON (whitespace included), which ends the answer anyway
        max_tokens = max(max_tokens, CONSTRAINED_ANSWER_TOKENS)
    completion = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=max_tokens, seed=seed, **constraint)
    choices = getattr(completion, 'choices', None)
    if not choices or not hasattr(choices[0], 'message'):
        raise ValueError(f"the judge server sent no completion: {str(completion)[:80]!r}")
    answer = choices[0].message.content or ''
    if not answer.strip():  # a failure to ask again, not an answer to keep
        raise ValueError(f"the judge gave an empty answer (one that reasons before it answers may spend all of its "
                         f"{max_tokens} tokens first)")
    return answer


def cache_key(messages: List[Dict[str, str]], judge: str, prompt_version: str, seed: int, max_tokens: int) -> str:
    """A judgment's key in a cache: its messages, the judge, the prompt's version, the seed and the answer length."""
    identity = [messages, judge, prompt_version, seed, max_tokens]
    return hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()


def fatal_error_message(error: Exception, base_url: str, judge: str, cache_path: str) -> Optional[str]:
    """What to tell the user when no later request can succeed either (None: only this judgment failed)."""
    url = public_url(base_url)
    if isinstance(error, FATAL_ERRORS):
        return (f"the judge server at {url} refused the request ({describe_error(error)}); "
                f"check --judge '{judge}', --base-url and OPENAI_API_KEY")
    if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
        return (f"lost the judge server at {url} ({describe_error(error)}); the judgments received are in "
                f"{cache_path}: restart the server and rerun to continue")
    return None


def ask_all(requests: Dict[str, Callable[[], dict]], concurrency: int, on_error: Callable[[Exception], Optional[str]],
            report: Optional[Callable[[str, Optional[dict], Optional[str]], None]] = None) -> Dict[str, str]:
    """Run every request (key -> a call that asks the judge and caches its record) on `concurrency` threads.

    Returns the errors by key: a request that still fails after the client's retries is counted there and
    left out of the cache, so a rerun asks again. An error that `on_error` turns into a message ends the
    run with a JudgeError. `report(key, record, error)` hears of every outcome.
    """
    errors: Dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(call): key for key, call in requests.items()}
        # the bar closes before an error's line is printed
        with tqdm(as_completed(futures), total=len(futures), desc='judging', unit='judgment') as done:
            for future in done:
                key = futures[future]
                try:
                    record = future.result()
                except (openai.APIError, ValueError) as error:
                    fatal = on_error(error)
                    if fatal:
                        raise JudgeError(fatal) from None
                    errors[key] = describe_error(error)
                    if report:
                        report(key, None, errors[key])
                    continue
                if report:
                    report(key, record, None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return errors


class JudgmentCache:
    """An append-only JSONL file of judgments, one line each, flushed and fsynced as written.

    A last line cut by a crash is dropped when the file is opened, so appends start on a line of their own.
    """

    def __init__(self, path: str):
        self.path = path
        self.records: Dict[str, dict] = {}
        self.lock = threading.Lock()
        if os.path.exists(path):
            self._read()
        self.file = None  # opened at the first judgment: a run that judges nothing leaves no file

    def _read(self) -> None:
        """The judgments of the file, read before the file is touched; a line that is no judgment is skipped, and
        a file of none (another file given as the cache) refused."""
        if os.path.isdir(self.path):
            raise DataError(f"{self.path}: a directory, not a judgment cache (JSON Lines); give the cache a file path")
        unreadable = []
        for number, line in enumerate(complete_lines(self.path), start=1):
            try:
                record = json.loads(line)
                self.records[record['key']] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                unreadable += [number] if line.strip() else []
        if unreadable and not self.records:
            raise DataError(f"{self.path}: line {unreadable[0]} is no judgment, nor is any other line: this is not a "
                            f"judgment cache; give the cache another path (nothing was written to it)")
        for number in unreadable:
            print(f"skipping unreadable line {number} of {self.path}", file=sys.stderr)
        if drop_cut_last_line(self.path):
            print(f"dropping an incomplete last line of {self.path} (an interrupted write)", file=sys.stderr)

    def add(self, record: dict) -> None:
        with self.lock:
            if self.file is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.file = open(self.path, 'a', encoding='utf-8')
            self.file.write(json.dumps(record, ensure_ascii=False) + '\n')
            self.file.flush()
            os.fsync(self.file.fileno())
            self.records[record['key']] = record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> 'JudgmentCache':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

