"""The OpenAI wire format: validate request bodies and shape responses (no HTTP here)."""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from pyllama_jax.serve.logprobs import MAX_COMPLETIONS, TOP

_NUMBER = (int, float)


class APIError(Exception):
    """An error the client caused (or a full server), sent as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """Validated generation parameters shared by both endpoints."""

    model: str | None
    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool
    logprobs: int | None = None  # alternatives to report per token; None: no logprobs
    echo: bool = False  # completions: the prompt leads the text (and its tokens the logprobs)


# field -> (accepted Python types, description used in error messages)
_COMMON: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "max_tokens": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "top_k": ((int,), "an integer"),  # extension (as in vLLM)
    "n": ((int,), "an integer"),
    "stop": ((str, list), "a string or a list of strings"),
    "seed": ((int,), "an integer"),
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "ignore_eos": ((bool,), "a boolean"),  # extension (as in vLLM): generate exactly max_tokens
    "user": ((str,), "a string"),
}
_COMPLETIONS = {**_COMMON, "prompt": ((str, list), "a string, a list of strings or a list of token ids"),
                "logprobs": ((int,), f"an integer from 0 to {MAX_COMPLETIONS}"), "echo": ((bool,), "a boolean")}
_CHAT = {**_COMMON, "messages": ((list,), "a list of messages"),
         "max_completion_tokens": ((int,), "an integer"), "logprobs": ((bool,), "a boolean"),
         "top_logprobs": ((int,), f"an integer from 0 to {TOP}")}
# OpenAI fields accepted only at their neutral value (what not sending them means).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "top_logprobs": (0,),
    "logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (False, True), "response_format": ({"type": "text"},),
    "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
}
_ONLY_IN = {"echo": "/v1/completions", "top_logprobs": "/v1/chat/completions (completions take 'logprobs': N)"}


def _lone_surrogate(value: Any) -> str | None:
    """The first lone UTF-16 surrogate in the strings of JSON value `value`, or None. JSON can spell
    half a pair ("\\ud800"), but that is not Unicode text: UTF-8 and the tokenizer cannot take it."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError as e:
                return v[e.start]
        elif isinstance(v, dict):
            stack += [*v, *v.values()]
        elif isinstance(v, list):
            stack += v
    return None


def _check_fields(body: Any, spec: dict[str, tuple[tuple[type, ...], str]], required: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in spec:
            types, what = spec[name]
            if value is None and name != required:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise APIError(400, f"'{name}' must be {what}, got {type(value).__name__} {value!r:.60}", name,
                               code="invalid_type")
            surrogate = _lone_surrogate(value)
            if surrogate is not None:
                raise APIError(400, f"'{name}' is not valid Unicode text: it contains the lone surrogate "
                               f"{ascii(surrogate)}, half of a UTF-16 pair", name, code="invalid_value")
        elif name in _NEUTRAL:
            if value is not None and value not in _NEUTRAL[name]:
                where = f": it is a field of {_ONLY_IN[name]}" if name in _ONLY_IN else ""
                raise APIError(400, f"'{name}'={value!r:.60} is not supported by this server{where}", name,
                               code="unsupported_parameter")
        else:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name, code="unknown_parameter")
    if body.get(required) is None:
        raise APIError(400, f"'{required}' is required", required, code="missing_required_parameter")
    return body


def _range(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    value = default if value is None else value
    if not low <= value <= high:
        raise APIError(400, f"'{name}'={value} is out of range: expected {low} to {high}", name,
                       code="invalid_value")
    return value


def _params(body: dict[str, Any], max_tokens_field: str, max_n: int, logprobs: int | None = None,
            echo: bool = False) -> Params:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop", code="invalid_value")
    max_tokens = body.get(max_tokens_field, body.get("max_tokens"))
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        also = "" if echo or max_tokens < 0 else " (0, to score the prompt, needs 'echo': true)"
        raise APIError(400, f"'{max_tokens_field}'={max_tokens}: expected at least {0 if echo else 1}{also}",
                       max_tokens_field, code="invalid_value")
    options = body.get("stream_options") or {}
    return Params(model=body.get("model"), max_tokens=max_tokens,
                  temperature=float(_range(body, "temperature", 1.0, 0.0, 2.0)),
                  top_p=float(_range(body, "top_p", 1.0, 1e-9, 1.0)),
                  top_k=int(_range(body, "top_k", 0, 0, 1 << 30)),
                  n=int(_range(body, "n", 1, 1, max_n)), stop=tuple(stop), seed=body.get("seed"),
                  stream=bool(body.get("stream")), include_usage=bool(options.get("include_usage")),
                  ignore_eos=bool(body.get("ignore_eos")), logprobs=logprobs, echo=echo)


def parse_completion(body: Any, max_n: int) -> tuple[list[str | list[int]], Params]:
    """Prompts (texts or token id lists) and parameters of a `/v1/completions` body."""
    body = _check_fields(body, _COMPLETIONS, "prompt")
    prompt = body["prompt"]
    ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompt, str) or ids(prompt):
        prompts: list = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
        prompts = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       "lists of token ids", "prompt", code="invalid_type")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = int(_range(body, "logprobs", 0, 0, MAX_COMPLETIONS))
    return prompts, _params(body, "max_tokens", max_n, logprobs, bool(body.get("echo")))


def parse_chat(body: Any, max_n: int) -> tuple[list[dict[str, str]], Params]:
    """Messages (role and text content) and parameters of a `/v1/chat/completions` body."""
    body = _check_fields(body, _CHAT, "messages")
    messages = []
    for i, m in enumerate(body["messages"]):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where} must be an object whose 'role' is system, developer, user or assistant",
                           where, code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", where, code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts", where,
                           code="invalid_type")
        messages.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not messages:
        raise APIError(400, "'messages' must not be empty", "messages", code="invalid_value")
    top = int(_range(body, "top_logprobs", 0, 0, TOP))
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", code="invalid_value")
    return messages, _params(body, "max_completion_tokens", max_n, top if body.get("logprobs") else None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, choices: list[dict], use: dict | None = None) -> dict[str, Any]:
    """The fields every completion response and stream chunk carries."""
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": logprobs}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
