"""A model behind a serving endpoint (llama.cpp's llama-server, ...) as a backend that scores only.

What a deployer runs is a server, with its own build, chat template and settings; this backend asks that server, over
HTTP, what the in-process backends compute: the summed log-probabilities of each label's tokens after each prompt
(`score`), and its tokenizer (`check_tokens`). The residual stream cannot be read or edited over HTTP, so the
causal-feature half of a canary is reported as not checkable, and the stages that need hooks refuse it.

Adapters (`ADAPTERS`; only tested ones count as supported):
- `llama-server` (supported; tested against a real llama-server built from the vendored llama.cpp source):
  `/props` (chat template, BOS, build), `/v1/models` (vocabulary and width: another model behind the URL is refused),
  `/tokenize`, `/detokenize`, `/apply-template` (the server renders the chat prompt with its own template: template
  drift is seen), and `/completion` with the prompt as token ids, one token generated and `n_probs` top
  log-probabilities before sampling (the softmax over the whole vocabulary). A label token outside the top
  `n_probs` costs one more request with `n_probs` = the vocabulary. Multi-token labels: one request per label
  prefix (the server's prompt cache reuses the prompt).
- llama-cpp-python's OpenAI-compatible server (`echo` with `logprobs`), vLLM (`prompt_logprobs`): not built; their
  limits are in docs/deployment.md. Ollama returns at most 20 top log-probabilities of generated tokens and cannot
  score a given continuation outside them, so it cannot be a scoring backend.

Every request has a timeout (`timeout` seconds) and at most `retries` retries on a refused connection, a timeout or
an HTTP 5xx (0.5 s, then 1 s, ... between them), so nothing waits longer than about (retries + 1) x timeout; every
failure is one EmoscopeError line naming the URL and what went wrong.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import EmoscopeError
from .base import token_mismatch

ADAPTERS = ("llama-server",)
"""Serving APIs this backend speaks (tested against the real server)."""


class Http:
    """JSON over HTTP to one server: bounded retries, a timeout per request, every failure one line."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2):
        if not url.startswith(("http://", "https://")):
            raise EmoscopeError(f"endpoint '{url}' is not an http:// or https:// URL")
        self.url, self.timeout, self.retries = url.rstrip("/"), float(timeout), int(retries)

    def get(self, path: str) -> dict:
        return self._call(path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._call(path, body)

    def _call(self, path: str, body: dict | None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                return self._once(path, body)
            except _Retry as e:
                if attempt == self.retries:
                    raise EmoscopeError(f"endpoint {self.url}{path}: {e} (after {attempt + 1} tries)") from None
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _once(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = _first_line(e.read())
            if e.code >= 500:
                raise _Retry(f"HTTP {e.code} {detail}") from None
            raise EmoscopeError(f"endpoint {self.url}{path}: HTTP {e.code} {detail}") from None
        except (socket.timeout, TimeoutError):
            raise _Retry(f"no answer within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Retry(f"no answer within {self.timeout:g} s") from None
            raise _Retry(f"cannot connect ({e.reason})") from None
        except (OSError, http.client.HTTPException) as e:  # reset, closed mid-answer, a truncated body
            raise _Retry(f"connection failed ({type(e).__name__}: {e})") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise EmoscopeError(f"endpoint {self.url}{path}: the answer is not JSON ({_first_line(raw)!r}): is "
                                "this a llama-server?") from None


class _Retry(Exception):
    """A failure worth another try: a refused connection, a timeout, an HTTP 5xx."""


def _first_line(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return (text.splitlines() or [""])[0][:160]


def _field(answer, *keys, path: str, url: str):
    """answer[keys[0]][keys[1]]..., or one line saying the server's answer lacks it."""
    try:
        for k in keys:
            answer = answer[k]
        return answer
    except (KeyError, IndexError, TypeError):
        raise EmoscopeError(f"endpoint {url}{path}: the answer has no {'.'.join(map(str, keys))}: is this a "
                            "llama-server?") from None


class ServerTokenizer:
    """The server's own tokenizer and chat template, with the subset of a transformers tokenizer's interface the
    prompts use: `tok(text, add_special_tokens=...)`, `decode`, `apply_chat_template`, `chat_template`,
    `bos_token`, `len(tok)`."""

    def __init__(self, http: Http, props: dict, n_vocab: int):
        self.http, self.n_vocab = http, n_vocab
        self.chat_template = props.get("chat_template") or None
        self.bos_token = props.get("bos_token") or None
        self.eos_token = props.get("eos_token") or None
        self._cache: dict[tuple[str, bool], list[int]] = {}
        self._rendered: dict[str, str] = {}

    def __len__(self) -> int:
        return self.n_vocab

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> SimpleNamespace:
        key = (text, bool(add_special_tokens))
        if key not in self._cache:
            ans = self.http.post("/tokenize", {"content": text, "add_special": bool(add_special_tokens),
                                               "parse_special": True})
            try:
                self._cache[key] = [int(t) for t in _field(ans, "tokens", path="/tokenize", url=self.http.url)]
            except (TypeError, ValueError):
                raise EmoscopeError(f"endpoint {self.http.url}/tokenize: tokens are not token ids: is this a "
                                    "llama-server?") from None
        return SimpleNamespace(input_ids=list(self._cache[key]))

    def decode(self, ids) -> str:
        ans = self.http.post("/detokenize", {"tokens": [int(i) for i in ids]})
        return _field(ans, "content", path="/detokenize", url=self.http.url)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **_) -> str:
        if tokenize or not add_generation_prompt:
            raise EmoscopeError("the server renders chat prompts as text with the generation prompt only")
        key = json.dumps(messages, sort_keys=True)  # a canary check renders each prompt three times
        if key not in self._rendered:
            ans = self.http.post("/apply-template", {"messages": messages})
            self._rendered[key] = _field(ans, "prompt", path="/apply-template", url=self.http.url)
        return self._rendered[key]


class EndpointModel:
    """A model served by llama-server, scored over HTTP: the `score` and `check_tokens` operations of the model
    interface (`backends.base.Backend`). Its tokenizer and chat template are the server's."""

    backend = "endpoint"
    supports = frozenset({"score", "check_tokens"})
    n_layers = 0  # not visible over HTTP

    def __init__(self, url: str, adapter: str = "llama-server", timeout: float = 30.0, retries: int = 2,
                 n_probs: int = 100, chat: bool | None = None):
        if adapter not in ADAPTERS:
            raise EmoscopeError(f"unknown endpoint adapter '{adapter}': choose {', '.join(ADAPTERS)}")
        self.http, self.adapter, self.n_probs = Http(url, timeout, retries), adapter, int(n_probs)
        self.props = self.http.get("/props")
        info = _field(self.http.get("/v1/models"), "data", 0, path="/v1/models", url=self.http.url)
        meta = _field(info, "meta", path="/v1/models", url=self.http.url)
        if not (isinstance(self.props, dict) and isinstance(info, dict) and isinstance(meta, dict)):
            raise EmoscopeError(f"endpoint {self.http.url}: /props or /v1/models is not a JSON object: is this a "
                                "llama-server?")
        try:
            self.n_vocab, self.d_model = int(meta.get("n_vocab", 0)), int(meta.get("n_embd", 0))
        except (TypeError, ValueError):
            self.n_vocab = 0
        if self.n_vocab <= 0:
            raise EmoscopeError(f"endpoint {self.http.url}/v1/models: no vocabulary size (meta.n_vocab): is this a "
                                "llama-server?")
        self.model_id, self.meta = str(info.get("id", "")), meta
        self.name = f"{self.http.url} ({self.model_id})"
        self.tokenizer = ServerTokenizer(self.http, self.props, self.n_vocab)
        self.chat = bool(self.tokenizer.chat_template) if chat is None else chat
        n_ctx = _field(self.props, "default_generation_settings", "n_ctx", path="/props", url=self.http.url)
        self.max_context = int(n_ctx)
        self.weights = f"served by {adapter} at {self.http.url}: {self.model_id}, {meta.get('ftype', '?')}"
        self.settings = None
        self.requests = {"completion": 0, "whole_vocabulary": 0}
        """Scoring requests made, and how many of them asked for the whole vocabulary (a label token outside the
        top n_probs)."""

    def describe(self) -> dict:
        """What answered, for a result row: the server, its build, the model file and its type."""
        return {"runtime": self.adapter, "url": self.http.url, "build": self.props.get("build_info"),
                "model": self.model_id, "file_type": self.meta.get("ftype"), "n_params": self.meta.get("n_params")}

    def check_tokens(self, prompts: list[str], ids: list[list[int]], labels: list[str],
                     label_ids: list[list[int]]) -> None:
        """Refuse a server whose tokenizer encodes these prompts or labels into other ids than the reference's."""
        wrong = token_mismatch(lambda text, special: self.tokenizer(text, add_special_tokens=special).input_ids,
                               self.tokenizer.bos_token, prompts, ids, labels, label_ids)
        if wrong:
            raise EmoscopeError(f"endpoint {self.http.url}: the server tokenizes {wrong}: another model or tokenizer "
                                "is behind the URL")

    # ------------------------------------------------------------------ scoring
    def next_logprobs(self, ids: list[int], wanted: list[int]) -> dict[int, float]:
        """log p(token | ids) for each wanted token: the server's top `n_probs` before sampling, and the whole
        vocabulary when a wanted token is not among them."""
        for n in dict.fromkeys((min(self.n_probs, self.n_vocab), self.n_vocab)):
            top = self._top(ids, n)
            if all(t in top for t in wanted):
                return {t: top[t] for t in wanted}
        missing = [t for t in wanted if t not in top]
        raise EmoscopeError(f"endpoint {self.http.url}: token {missing[0]} is not in the server's vocabulary of "
                            f"{self.n_vocab}: another model is behind the URL")

    def _top(self, ids: list[int], n: int) -> dict[int, float]:
        body = {"prompt": [int(i) for i in ids], "n_predict": 1, "n_probs": int(n), "temperature": 0.0,
                "cache_prompt": True, "post_sampling_probs": False, "stream": False}
        self.requests["completion"] += 1
        self.requests["whole_vocabulary"] += n >= self.n_vocab
        ans = self.http.post("/completion", body)
        top = _field(ans, "completion_probabilities", 0, "top_logprobs", path="/completion", url=self.http.url)
        try:
            return {int(p["id"]): float(p["logprob"]) for p in top}
        except (KeyError, TypeError, ValueError):
            raise EmoscopeError(f"endpoint {self.http.url}/completion: top_logprobs without id and logprob: is "
                                "this a llama-server?") from None

    def score_ids(self, prompts: list[list[int]], labels: list[list[int]], batch_size: int = 8, progress=None,
                  resid_layers: list[int] = ()):
        """[n, K] summed label log-probs after each prompt, asked of the server (one request per distinct label
        prefix). The residual stream is not readable over HTTP."""
        if resid_layers:
            raise EmoscopeError("an endpoint cannot read the residual stream: only label scores go over HTTP")
        out = np.zeros((len(prompts), len(labels)))
        for i, p in enumerate(prompts):
            out[i] = self._score_one(list(p), labels)
            if progress:
                progress(1)
        return out

    def _score_one(self, prompt: list[int], labels: list[list[int]]) -> np.ndarray:
        wanted: dict[tuple[int, ...], set[int]] = {}
        for lab in labels:  # every prefix of every label, and the tokens wanted after it
            for j, t in enumerate(lab):
                wanted.setdefault(tuple(lab[:j]), set()).add(int(t))
        got = {pre: self.next_logprobs(prompt + list(pre), sorted(ts)) for pre, ts in wanted.items()}
        return np.array([sum(got[tuple(lab[:j])][int(t)] for j, t in enumerate(lab)) for lab in labels])

    def label_logits(self, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:
        """The log-probabilities of `tokens` at each prompt's answer position [n, K]: the logits up to each row's
        log-normaliser, which every margin between labels cancels."""
        rows = [[self.next_logprobs(list(p), list(tokens))[t] for t in tokens] for p in prompts]
        return torch.tensor(rows, dtype=torch.float32)

    def ablate_each(self, *args, **kwargs):
        raise EmoscopeError("an endpoint cannot edit the residual stream: run ablations in-process")

    def token_logits(self, ids: list[int]) -> np.ndarray:
        raise EmoscopeError("an endpoint returns the top log-probabilities of generated tokens, not every "
                            "position's logits: measure KLD in-process")
