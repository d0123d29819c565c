"""The HTTP layer: OpenAI-compatible endpoints over an `Engine`, server-sent events, the chat page.

    POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent events;
        `logprobs`, completions' `echo`: see `serve.logprobs`)
    GET /v1/models, GET /v1/models/{id}, GET /health, GET / (the web chat)
    GET /tokenizer_info, POST /tokenize, POST /detokenize (vLLM's, which lm-eval's remote tokenizer uses)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
from typing import Any, Awaitable, Callable

from aiohttp import web

from pyllama_jax.serve import protocol
from pyllama_jax.serve.engine import Engine, Event, QueueFull, Request
from pyllama_jax.serve.logprobs import TokenLogprob, chat_logprobs, completion_logprobs, entry
from pyllama_jax.serve.protocol import APIError, Params

log = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(__file__), "static")
_KEY = web.AppKey("api_key", str)
_GUARDED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # paths the API key protects


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where the server listens and who may call it (the `serve` section's server part)."""

    host: str = "127.0.0.1"  # address to bind; anything but loopback requires an API key
    port: int = 8000  # TCP port (0 = any free port, printed at start)
    api_key: str = ""  # bearer token required on /v1/ (or $PYLLAMA_API_KEY); "" = none, local use only
    model_name: str = ""  # the model id clients send ("" = the model's file or folder name)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every error leaves as an OpenAI-style JSON body; a configured API key guards /v1/."""
    try:
        key = request.app[_KEY]
        if key and request.path.startswith(_GUARDED):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.json_response(APIError(e.status, f"{e.reason}: {request.method} {request.path}").body(),
                                 status=e.status)


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


class _Job:
    """The engine requests behind one HTTP request: one per (prompt, choice), events to one queue."""

    def __init__(self, engine: Engine, prompts: list[list[int]], p: Params, default_max_tokens: Callable[[int], int]):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.prompt_tokens = sum(len(t) for t in prompts)
        base = secrets.randbits(31) if p.seed is None else p.seed
        self.requests = []
        if p.max_tokens == 0:  # echo only: the prompt is scored, nothing is generated
            return
        for i, ids in enumerate(prompts):
            max_tokens = default_max_tokens(len(ids)) if p.max_tokens is None else p.max_tokens
            try:
                engine.check(len(ids), max_tokens)
            except ValueError as e:
                raise APIError(400, str(e), "max_tokens", code="context_length_exceeded") from None
            for j in range(p.n):
                index = i * p.n + j
                self.requests.append(Request(
                    ids, max_tokens, self._forward(index), temperature=p.temperature, top_p=p.top_p,
                    top_k=p.top_k, seed=base + j, stop=p.stop, ignore_eos=p.ignore_eos, logprobs=p.logprobs))
        try:
            engine.submit(*self.requests)
        except QueueFull as e:
            raise APIError(503, str(e), kind="server_overloaded", code="queue_full") from None

    def _forward(self, index: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:  # engine thread -> event loop
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
        return put

    async def __aiter__(self):
        """(choice index, event) until every choice has finished."""
        running = len(self.requests)
        while running:
            index, event = await self.events.get()
            if event.finish_reason == "error":
                raise APIError(500, "generation failed on the server", kind="server_error")
            running -= event.finish_reason is not None
            yield index, event

    def cancel(self) -> None:
        self.engine.cancel(*self.requests)


class _Choice:
    """One choice's text and logprobs as they grow, so each streamed piece carries its own offsets."""

    def __init__(self, api: "API", chat: bool, prompt: list[int], logprobs: bool):
        self.tokenizer, self.chat, self.want = api.tokenizer, chat, logprobs
        self.text, self.before, self.finish_reason = "", prompt[-4:], None
        self.logprobs: dict[str, list] | None = None
        self.tokens = 0  # generated tokens, known when the choice finishes

    def add(self, text: str, entries: list[TokenLogprob] | None) -> dict | None:
        """Append `text` (made of `entries`' tokens); return the logprobs object of this piece."""
        part = None
        if self.want:
            entries = entries or []
            part = (chat_logprobs(self.tokenizer, entries, self.before) if self.chat else
                    completion_logprobs(self.tokenizer, entries, len(self.text), self.before))
            self.before = (self.before + [e.token for e in entries])[-4:]
            self.logprobs = part if self.logprobs is None else {k: v + part[k] for k, v in self.logprobs.items()}
        self.text += text
        return part

    def event(self, event: Event) -> dict | None:
        if event.finish_reason:
            self.finish_reason, self.tokens = event.finish_reason, event.completion_tokens
        return self.add(event.text, event.logprobs)


class API:
    """Route handlers; `engine` runs the model, `tokenizer` renders prompts."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name, self.tokenizer = engine, model_name, engine.tokenizer
        # one tokenizing thread, off the event loop: a fixed set of threads (and of their malloc
        # arenas), so the server's memory does not grow with the number of concurrent requests
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._scoring = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="score")  # echo's forwards

    def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def _check_model(self, p: Params) -> None:
        if p.model is not None and p.model != self.model_name:
            raise APIError(404, f"The model '{p.model}' does not exist; this server has '{self.model_name}'",
                           "model", code="model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        prompts, p = protocol.parse_completion(await _json(request), self.engine.slots)
        self._check_model(p)
        ids = await self._off_loop(self._prompt_ids, prompts)
        echoed = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] if p.echo else None
        return await self._respond(request, ids, p, chat=False, echoed=echoed)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        messages, p = protocol.parse_chat(await _json(request), self.engine.slots)
        self._check_model(p)
        return await self._respond(request, [await self._off_loop(self._chat_ids, messages)], p, chat=True)

    def _prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt's token ids, checked. Runs in a worker thread: a huge prompt takes seconds."""
        ids = []
        for i, prompt in enumerate(prompts):
            row = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            if not row:
                raise APIError(400, f"prompt {i} is empty", "prompt", code="invalid_value")
            bad = [t for t in row if not 0 <= t < self.engine.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.engine.config.vocab_size})", "prompt", code="invalid_value")
            ids.append(row)
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The rendered conversation's token ids. Runs in a worker thread, like `_prompt_ids`."""
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except ValueError as e:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(400, str(e), "messages", code="invalid_value") from None
        return self.tokenizer.encode(text)

    async def _respond(self, request: web.Request, ids: list[list[int]], p: Params, chat: bool,
                       echoed: list[str] | None = None) -> web.StreamResponse:
        """Run the job; `echoed`: each prompt's text, to lead its choices (`echo`)."""
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        default = (lambda n: max(1, self.engine.context - n)) if chat else (lambda n: 16)
        job = _Job(self.engine, ids, p, default)
        choices = [_Choice(self, chat, [] if echoed else ids[i // p.n], p.logprobs is not None)
                   for i in range(len(ids) * p.n)]
        try:
            lead = await self._echo(ids, echoed, p) if echoed else None
            if p.stream:
                return await self._stream(request, job, p, chat, choices, lead)
            for c, (text, entries) in zip(choices, [lead[i // p.n] for i in range(len(choices))] if lead else ()):
                c.add(text, entries)
            async for index, event in job:
                choices[index].event(event)
            return web.json_response(self._body(job, p, chat, choices))
        finally:  # the client went away (the handler is cancelled) or we are done: free the slots
            job.cancel()

    async def _echo(self, ids: list[list[int]], texts: list[str], p: Params) -> list[tuple[str, list | None]]:
        """Each prompt's text and, with logprobs, its tokens' (the first has none: nothing predicts it)."""
        if p.logprobs is None:
            return [(t, None) for t in texts]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._scoring, self.engine.score, ids, p.logprobs)
        except ValueError as e:
            raise APIError(400, str(e), "prompt", code="context_length_exceeded") from None
        return [(text, [TokenLogprob(row[0], None)] + [entry(t, lp, ti, tv, p.logprobs) for t, lp, ti, tv in zip(
            row[1:], s.logprobs, s.top_ids, s.top_logprobs)]) for text, row, s in zip(texts, ids, scores)]

    def _body(self, job: _Job, p: Params, chat: bool, choices: list[_Choice]) -> dict[str, Any]:
        if chat:
            made = [protocol.chat_choice(i, c.text, c.finish_reason, c.logprobs) for i, c in enumerate(choices)]
        else:
            made = [protocol.completion_choice(i, c.text, c.finish_reason or "length", c.logprobs)
                    for i, c in enumerate(choices)]
        return protocol.envelope(protocol.new_id("chatcmpl" if chat else "cmpl"),
                                 "chat.completion" if chat else "text_completion", self.model_name, made,
                                 protocol.usage(job.prompt_tokens, sum(c.tokens for c in choices)))

    async def _stream(self, request: web.Request, job: _Job, p: Params, chat: bool, choices: list[_Choice],
                      lead: list[tuple[str, list | None]] | None) -> web.StreamResponse:
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        obj = "chat.completion.chunk" if chat else "text_completion"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(choices: list[dict], use: dict | None = None) -> None:
            chunk = protocol.envelope(rid, obj, self.model_name, choices, use)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            for i in range(len(choices)):
                await send([protocol.chat_delta(i, {"role": "assistant", "content": ""}, None)])
        for i, c in enumerate(choices if lead else ()):
            text, entries = lead[i // p.n]
            done = "length" if not job.requests else None
            await send([protocol.completion_choice(i, text, done, c.add(text, entries))])
        try:
            async for index, event in job:
                part = choices[index].event(event)
                if chat:
                    await send([protocol.chat_delta(index, {"content": event.text} if event.text else {},
                                                    event.finish_reason, part)])
                else:
                    await send([protocol.completion_choice(index, event.text, event.finish_reason, part)])
        except APIError as e:
            await response.write(f"data: {json.dumps(e.body())}\n\n".encode())
        if p.include_usage:
            await send([], protocol.usage(job.prompt_tokens, sum(c.tokens for c in choices)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.model_name:
            raise APIError(404, f"The model '{request.match_info['name']}' does not exist", "model",
                           code="model_not_found")
        return web.json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pyllama-jax",
                "max_model_len": self.engine.context}

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        t = self.tokenizer
        text = lambda i: t.token_text(i) if i is not None else None
        return web.json_response({"eos_token": text(t.eos_id), "bos_token": text(t.bos_id), "pad_token": None,
                                  "chat_template": t.chat_template, "model_max_length": self.engine.context})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", "prompt", code="invalid_type")
        bos = None if body.get("add_special_tokens", True) else False
        tokens = await self._off_loop(lambda: self.tokenizer.encode(body["prompt"], bos=bos))
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.context})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens", code="invalid_type")
        return web.json_response({"prompt": await self._off_loop(self.tokenizer.decode, tokens)})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.model_name, **self.engine.stats()})

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC, "index.html"))


def create_app(engine: Engine, model_name: str, api_key: str = "") -> web.Application:
    """The aiohttp application serving `engine` under the model id `model_name`."""
    app = web.Application(middlewares=[_errors], client_max_size=8 << 20)
    app[_KEY] = api_key
    api = API(engine, model_name)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{name}", api.model)
    app.router.add_get("/health", api.health)
    app.router.add_get("/tokenizer_info", api.tokenizer_info)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    app.router.add_get("/", api.index)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = any free port), not yet listening; OSError if it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve(app: web.Application, sock: socket.socket, on_ready: Callable[[str], None]) -> None:
    """Listen on `sock` (from `bind`) until cancelled; `on_ready(url)` once listening."""
    host, port = sock.getsockname()[:2]
    # handler_cancellation: a client that disconnects cancels its handler, which frees its slots.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
