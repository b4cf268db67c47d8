"""`chainproof serve`: predictions over HTTP from a verified release, on 127.0.0.1.

FastAPI + uvicorn (already in the lock through MLflow). The model is loaded with
`load_verified`; a bundle that fails verification never starts a server. Requests are hostile:
the body size is capped before it is read, every value must be finite and inside the input
range the (verified) model card records, and no error repeats what the client sent.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, Field

from pipeline.release.loading import load_verified
from pipeline.workspace import DEFAULT_MODEL

MAX_INSTANCES = 1024
ACCESS_LOG = "chainproof.serve.access"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# JSON numbers only, and never NaN or ±Infinity (Python's json module accepts both literals).
Value = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Instance = list[Value] | list[list[Value]] | list[list[list[Value]]]


class PredictRequest(BaseModel):
    """A batch of inputs, each shaped like the model's input (or flattened to one list)."""

    instances: list[Instance] = Field(min_length=1, max_length=MAX_INSTANCES)


class PredictResponse(BaseModel):
    predictions: list[list[float]] = Field(description="class probabilities, one row per input")
    classes: list[int] = Field(description="the most probable class of each input")


class InputSpec(BaseModel):
    shape: list[int]
    dtype: str = "float32"
    range: list[float] | None = Field(
        None, description="[min, max] every value must lie in (the training data's range)"
    )


class Metadata(BaseModel):
    release: str
    model: str
    model_sha256: str
    verified: bool
    input_shape: list[int]
    input: InputSpec
    max_body_bytes: int


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: str | list[ErrorItem]


def body_limit(input_shape: tuple[int, ...]) -> int:
    """Room for MAX_INSTANCES inputs at a generous 32 bytes per JSON number, plus framing."""
    return MAX_INSTANCES * max(1, math.prod(input_shape)) * 32 + 64 * 1024


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, by its Content-Length before
    anything is read, and by counting chunks otherwise, so no request body is held whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _plain(send, 400, "Content-Length is not a number")
                return
            if size > self.limit:
                await _plain(send, 413, self._message())
                return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answer now and tell the app the client left: it stops reading, and what
                    # it would send after that is dropped below.
                    refused = True
                    await _plain(send, 413, self._message())
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes; send fewer instances per request"


async def _plain(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """ASGI middleware: one line per request (client, method, path, status, bytes, time).
    The path only, never the query string or the body: they are the client's data."""

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app, self.logger = app, logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status, sent = time.perf_counter(), 500, 0

        async def watch(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client") or ("-", 0)
            path = str(scope.get("path", ""))[:200].encode("unicode_escape").decode()
            self.logger.info(
                '%s "%s %s" %d %dB %.1fms',
                client[0],
                scope.get("method", "-"),
                path,
                status,
                sent,
                (time.perf_counter() - t0) * 1000,
            )


def _validation_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's validation errors without their `input` and `ctx` (which echo the request)."""
    out = []
    for e in list(errors)[:20]:
        loc = [p if isinstance(p, int) else str(p)[:64] for p in e.get("loc", ())][:8]
        out.append({"loc": loc, "msg": str(e.get("msg", "invalid"))[:200], "type": e.get("type")})
    return out


def create_app(
    model: Any,
    metadata: dict[str, Any],
    *,
    input_range: tuple[float, float] | None = None,
    max_body_bytes: int | None = None,
    logger: logging.Logger | None = None,
) -> Any:
    import numpy as np
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    input_shape = tuple(int(d) for d in model.input_shape[1:])
    limit = max_body_bytes or body_limit(input_shape)
    # No /docs or /redoc: their pages load JavaScript from a CDN and are blank offline. The
    # OpenAPI document itself is served at /openapi.json for any local viewer or client.
    app = FastAPI(title="chainproof model server", version="1", docs_url=None, redoc_url=None)
    info = Metadata(
        **metadata,
        input_shape=list(input_shape),
        input=InputSpec(shape=list(input_shape), range=list(input_range) if input_range else None),
        max_body_bytes=limit,
    )
    errors: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorResponse, "description": "request body too large"},
        422: {"model": ErrorResponse, "description": "not a valid batch for this model"},
    }

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _validation_errors(exc.errors())})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata", response_model=Metadata)
    def meta() -> Metadata:
        return info

    @app.post("/predict", response_model=PredictResponse, responses=errors)
    def predict(req: PredictRequest) -> PredictResponse:
        try:
            with np.errstate(over="ignore"):  # too large for float32 -> inf, refused below
                x = np.asarray(req.instances, dtype=np.float32)
        except ValueError:
            raise HTTPException(
                422, "instances must all have the same shape (no ragged lists)"
            ) from None
        if x.shape[1:] != input_shape:
            if x.reshape(len(x), -1).shape[1:] == (math.prod(input_shape),):
                x = x.reshape((len(x), *input_shape))
            else:
                raise HTTPException(
                    422,
                    f"each instance must have shape {list(input_shape)} "
                    f"(or {math.prod(input_shape)} values flat); got shape {list(x.shape[1:])}",
                )
        # float32 overflow: a finite JSON number such as 1e39 becomes inf here.
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise HTTPException(422, f"{bad} value(s) are not finite float32 numbers")
        if input_range is not None:
            lo, hi = input_range
            outside = int(np.count_nonzero((x < lo) | (x > hi)))
            if outside:
                raise HTTPException(
                    422,
                    f"{outside} of {x.size} value(s) lie outside [{lo:g}, {hi:g}], the range of "
                    "the training data (the model card's input.range); scale inputs the same way",
                )
        probs = model.predict(x, verbose=0)
        return PredictResponse(
            predictions=probs.tolist(), classes=[int(i) for i in probs.argmax(axis=1)]
        )

    wrapped: ASGIApp = BodyLimit(app, limit)
    return AccessLog(wrapped, logger or logging.getLogger(ACCESS_LOG))


def card_input_range(bundle: Path) -> tuple[float, float] | None:
    """[min, max] from the bundle's (already verified) model card, when it records one."""
    card = bundle / "artifacts" / PurePosixPath(DEFAULT_MODEL).parent / "model_card.json"
    try:
        rng = json.loads(card.read_text()).get("input", {}).get("range")
    except (OSError, ValueError, AttributeError):
        return None
    if (
        isinstance(rng, list)
        and len(rng) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in rng)
        and rng[0] <= rng[1]
    ):
        return float(rng[0]), float(rng[1])
    return None


def serve(
    bundle: Path,
    *,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    min_version: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    import hashlib
    import sys

    import uvicorn

    model = load_verified(
        bundle, owner_key=owner_key, owner_key_file=owner_key_file, min_version=min_version
    )
    data = (bundle / "artifacts" / DEFAULT_MODEL).read_bytes()
    metadata = {
        "release": str(bundle),
        "model": DEFAULT_MODEL,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "verified": True,
    }
    input_range = card_input_range(bundle)
    logger = logging.getLogger(ACCESS_LOG)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if on_ready:
        checked = f"values in {list(input_range)}" if input_range else "no input range recorded"
        on_ready(
            f"serving {bundle} (verified) on http://{host}:{port}  POST /predict "
            f"({checked}; API description at /openapi.json; access log on stderr)"
        )
    app = create_app(model, metadata, input_range=input_range, logger=logger)
    uvicorn.run(app, host=host, port=port, log_level="warning")
