"""`python -m pipeline`: the same as the `chainproof` console script."""

from pipeline.cli import main

main()
