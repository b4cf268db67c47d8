"""`python -m pipeline.cli`: the same as the `chainproof` console script."""

from pipeline.cli import main

main()
