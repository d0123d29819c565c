"""The HTTP layer: OpenAI-compatible endpoints over an `Engine`, server-sent events, the chat page.

    POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent events)
    GET /v1/models, GET /v1/models/{id}, GET /health, GET / (the web chat)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
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
from pyllama_jax.serve.protocol import APIError, Params

log = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(__file__), "static")
_KEY = web.AppKey("api_key", str)


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
        if key and request.path.startswith("/v1/"):
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
                    top_k=p.top_k, seed=base + j, stop=p.stop, ignore_eos=p.ignore_eos))
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


class API:
    """Route handlers; `engine` runs the model, `tokenizer` renders prompts."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name, self.tokenizer = engine, model_name, engine.tokenizer
        # one tokenizing thread, off the event loop: a fixed set of threads (and of their malloc
        # arenas), so the server's memory does not grow with the number of concurrent requests
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def _check_model(self, p: Params) -> None:
        if p.model is not None and p.model != self.model_name:
            raise APIError(404, f"The model '{p.model}' does not exist; this server has '{self.model_name}'",
                           "model", code="model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        prompts, p = protocol.parse_completion(await _json(request), self.engine.slots)
        self._check_model(p)
        return await self._respond(request, await self._off_loop(self._prompt_ids, prompts), p, chat=False)

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

    async def _respond(self, request: web.Request, ids: list[list[int]], p: Params, chat: bool) -> web.StreamResponse:
        # OpenAI's defaults: 16 tokens for completions, the rest of the context for chat.
        default = (lambda n: max(1, self.engine.context - n)) if chat else (lambda n: 16)
        job = _Job(self.engine, ids, p, default)
        try:
            if p.stream:
                return await self._stream(request, job, p, chat)
            texts = [""] * len(job.requests)
            reasons: list[str | None] = [None] * len(job.requests)
            completion = 0
            async for index, event in job:
                texts[index] += event.text
                if event.finish_reason:
                    reasons[index] = event.finish_reason
                    completion += event.completion_tokens
            make = protocol.chat_choice if chat else protocol.completion_choice
            body = protocol.envelope(protocol.new_id("chatcmpl" if chat else "cmpl"),
                                     "chat.completion" if chat else "text_completion", self.model_name,
                                     [make(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))],
                                     protocol.usage(job.prompt_tokens, completion))
            return web.json_response(body)
        finally:  # the client went away (the handler is cancelled) or we are done: free the slots
            job.cancel()

    async def _stream(self, request: web.Request, job: _Job, p: Params, chat: bool) -> web.StreamResponse:
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        obj = "chat.completion.chunk" if chat else "text_completion"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(choices: list[dict], use: dict | None = None) -> None:
            chunk = protocol.envelope(rid, obj, self.model_name, choices, use)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            for i in range(len(job.requests)):
                await send([protocol.chat_delta(i, {"role": "assistant", "content": ""}, None)])
        completion = 0
        try:
            async for index, event in job:
                completion += event.completion_tokens if event.finish_reason else 0
                if chat:
                    await send([protocol.chat_delta(index, {"content": event.text} if event.text else {},
                                                    event.finish_reason)])
                else:
                    await send([protocol.completion_choice(index, event.text, event.finish_reason)])
        except APIError as e:
            await response.write(f"data: {json.dumps(e.body())}\n\n".encode())
        if p.include_usage:
            await send([], protocol.usage(job.prompt_tokens, completion))
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
