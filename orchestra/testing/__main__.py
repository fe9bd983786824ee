"""``python -m orchestra.testing [--port P] [--delay S] [--text T]``: serve a loopback LLM until killed."""

from orchestra.testing.loopback import main

main()
