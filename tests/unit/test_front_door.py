"""The front door: `pipeline` exports what its docstring promises."""

from __future__ import annotations

import inspect


def test_verify_is_the_function_the_docstring_documents() -> None:
    from pipeline import verify

    assert inspect.isfunction(verify)
    assert "owner_key" in inspect.signature(verify).parameters


def test_front_door_names() -> None:
    import pipeline

    assert set(pipeline.__all__) >= {"Error", "load_config", "load_verified", "run", "verify"}
    assert issubclass(pipeline.Error, Exception)
    assert callable(pipeline.load_config) and callable(pipeline.load_verified)
