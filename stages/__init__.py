"""Built-in stage kinds. Each module runs as `python -I -m stages.<kind> SPEC` in a locked
environment; they import pipeline's stage contract, never the other way round."""
