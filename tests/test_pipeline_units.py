"""Unit tests of the pipeline modules' rules (recruiting, aggregation, grading, skills, budgets,
dispatch), written to kill the mutants that mutation testing (``mutmut run``) showed surviving."""

from __future__ import annotations
