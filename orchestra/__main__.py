"""``python -m orchestra``: the command line."""

from orchestra.cli import command_line

command_line()
