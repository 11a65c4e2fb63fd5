"""A judge client for any OpenAI-compatible chat-completions endpoint, that never pays twice.

Every verdict lands in an append-only JSONL cache keyed by the image's hash and the full text
sent (protocol instruction, WISE prompt and explanation, judge model), flushed and synced
line by line: a crashed, interrupted or rerun job asks only for what is not there yet, and
the same image under the same prompt is never judged again, whatever folder it sits in.
Requests are bounded (`max_requests` in all, retries included), each has a timeout, and a
failed one (timeout, connection error, HTTP 429 / 5xx, a reply without a readable score) is
retried after an exponential backoff. Refusals that no retry fixes (HTTP 401 / 403 / 404:
wrong key, model or URL) stop the run at once.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

from strokes_jax.benchmarks import wise_protocol
from strokes_jax.benchmarks.store import BenchmarkError


class JudgeError(BenchmarkError):
    """The endpoint refuses every request (key, model or URL): stop, do not retry."""


class BudgetSpent(Exception):
    """max_requests reached; what was judged is in the cache."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    url: str  # the API base (http://host:8000/v1) or the full .../chat/completions URL
    model: str
    api_key: str | None = None
    timeout: float = 120.0  # seconds per request
    attempts: int = 3  # per image, as the official scripts (MAX_EXTRACT_RETRIES)
    backoff: float = 2.0  # seconds before the first retry, doubled each time (capped at 60)

    @property
    def chat_url(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


class Cache:
    """key -> judgment, backed by an append-only JSONL file. A line that does not parse (a
    crash mid-write leaves at most one) is ignored: its image is judged again."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._rows: dict[str, dict] = {}
        self.bad_lines = 0
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._rows[row["key"]] = row
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.bad_lines += bool(line.strip())

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def put(self, row: dict) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._rows[row["key"]] = row

    def __len__(self) -> int:
        return len(self._rows)


def cache_key(protocol: str, model: str, image_sha256: str, text: str) -> str:
    payload = json.dumps([protocol, model, image_sha256, text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Judge:
    """judge(protocol, prompt_id, prompt, explanation, image_path) -> cached row with
    `scores`, or None after `attempts` failed tries (logged in `failures`)."""

    def __init__(self, endpoint: Endpoint, cache: Cache, max_requests: int | None = None,
                 sleep=time.sleep, log=None):
        self.endpoint, self.cache, self.max_requests = endpoint, cache, max_requests
        self.sleep, self.log = sleep, log or (lambda msg: None)
        self.requests = 0  # sent by this client, retries included
        self.failures: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def _take_request(self) -> None:
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise BudgetSpent
            self.requests += 1

    def _post(self, body: bytes) -> str:
        """One request; the reply's message content. Raises _Retry, or JudgeError."""
        ep = self.endpoint
        headers = {"Content-Type": "application/json"}
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        req = urllib.request.Request(ep.chat_url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=ep.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").strip()
            if e.code in (401, 403, 404):
                raise JudgeError(f"judge {ep.chat_url}: HTTP {e.code} {e.reason} ({detail}): check --url, "
                                 f"--model and the API key") from None
            raise _Retry(f"HTTP {e.code} {detail}", retry_after=_retry_after(e)) from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"no reply within {ep.timeout:g}s") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise _Retry(f"connection failed: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise _Retry(f"malformed reply: {raw[:120]!r}") from None

    def judge(self, protocol: str, prompt_id: int, prompt: str, explanation: str,
              image_path: str) -> dict | None:
        with open(image_path, "rb") as f:
            image = f.read()
        image_sha = hashlib.sha256(image).hexdigest()
        text = wise_protocol.user_text(protocol, prompt, explanation)
        key = cache_key(protocol, self.endpoint.model, image_sha, text)
        if (hit := self.cache.get(key)) is not None:
            return hit
        msgs = wise_protocol.messages(protocol, prompt, explanation, base64.b64encode(image).decode())
        body = json.dumps({"model": self.endpoint.model, "messages": msgs,
                           **wise_protocol.REQUEST_OPTIONS[protocol]}).encode("utf-8")
        why = ""
        for attempt in range(self.endpoint.attempts):
            if attempt:
                wait = min(60.0, self.endpoint.backoff * 2 ** (attempt - 1))
                self.sleep(max(wait, getattr(why, "retry_after", 0.0)))
            self._take_request()
            try:
                reply = self._post(body)
            except _Retry as e:
                why = e
                self.log(f"prompt {prompt_id} ({protocol}): attempt {attempt + 1}: {e}")
                continue
            scores = wise_protocol.parse_reply(protocol, reply)
            if scores is None:
                why = _Retry(f"no {'/'.join(wise_protocol.SCORE_KEYS[protocol])} score in the reply "
                             f"{reply[:80]!r}")
                self.log(f"prompt {prompt_id} ({protocol}): attempt {attempt + 1}: {why}")
                continue
            row = {"key": key, "protocol": protocol, "model": self.endpoint.model, "prompt_id": prompt_id,
                   "image_sha256": image_sha, "reply": reply, "scores": scores}
            self.cache.put(row)
            return row
        with self._lock:
            self.failures.append((prompt_id, str(why)))
        return None


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(e: urllib.error.HTTPError) -> float:
    try:
        return min(60.0, float(e.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0
