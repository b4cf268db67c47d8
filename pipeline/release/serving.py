"""`chainproof serve`: predictions over HTTP from a verified release, on 127.0.0.1.

FastAPI + uvicorn (already in the lock through MLflow). The model is loaded with
`load_verified`; a bundle that fails verification never starts a server.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pipeline.release.loading import load_verified
from pipeline.workspace import DEFAULT_MODEL


class PredictRequest(BaseModel):
    """A batch of images: nested lists shaped like the model's input (or flattened)."""

    instances: list[Any] = Field(min_length=1, max_length=1024)


def create_app(model: Any, metadata: dict[str, Any]) -> Any:
    import numpy as np
    from fastapi import FastAPI, HTTPException

    input_shape = tuple(model.input_shape[1:])
    app = FastAPI(title="chainproof model server", version="1")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    def meta() -> dict[str, Any]:
        return {**metadata, "input_shape": list(input_shape)}

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:
        try:
            x = np.asarray(req.instances, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise HTTPException(422, f"instances must be numeric arrays: {e}") from e
        if x.shape[1:] != input_shape:
            x_flat = x.reshape(len(x), -1) if x.ndim >= 2 else x
            if x_flat.shape[1:] == (int(np.prod(input_shape)),):
                x = x_flat.reshape((len(x), *input_shape))
            else:
                raise HTTPException(
                    422,
                    f"each instance must have shape {list(input_shape)}; got {list(x.shape[1:])}",
                )
        probs = model.predict(x, verbose=0)
        return {
            "predictions": probs.tolist(),
            "classes": [int(i) for i in probs.argmax(axis=1)],
        }

    return app


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
    if on_ready:
        on_ready(f"serving {bundle} (verified) on http://{host}:{port}  POST /predict")
    uvicorn.run(create_app(model, metadata), host=host, port=port, log_level="warning")
