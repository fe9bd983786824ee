"""``python -m orchestra``: the command line."""

from orchestra.cli import main

main()
