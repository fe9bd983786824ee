"""The public API type-checks as a user's code uses it: the package is marked typed, and the
arguments the README documents are accepted by ``mypy --strict``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orchestra

PACKAGE = Path(orchestra.__file__).parent

USER_CODE = '''
import asyncio
from contextlib import aclosing

from orchestra import Agent, Budget, Instance, Orchestra, Pool
from orchestra.models import ChatRequest, ChatResult, ModelBase


class Gateway(ModelBase):
    def __init__(self) -> None:
        self.name = "gateway"

    async def _generate(self, request: ChatRequest) -> ChatResult:
        return ChatResult(text="4", model=self.name)


async def main() -> None:
    orc = Orchestra(Pool(agents=[Agent(name="a", model=Gateway())]), k=1, budget=Budget(max_calls=10))
    result = await orc.arun("What is 2 + 2?", plan={"subtasks": [{"id": "s", "task": "add"}]},
                            answer={"output": "json"})
    for node in result.plan.nodes:
        print(node.id, node.experts, node.aggregator, (node.recruitment or {}).get("explanation"))
    async with orc, aclosing(orc.arun_iter(Instance(q, meta={"id": i}) for i, q in enumerate(["x?"]))) as results:
        async for index, run in results:
            print(index, run.answer)


asyncio.run(main())
'''


def test_the_package_is_marked_typed() -> None:
    """Without ``py.typed`` a user's ``mypy --strict`` stopped at ``import orchestra`` ([import-untyped])
    and a ``ModelBase`` subclass was "Class cannot subclass ModelBase (has type Any)"."""
    assert (PACKAGE / "py.typed").is_file()


def test_user_code_as_the_readme_writes_it_passes_mypy_strict(tmp_path: Path) -> None:
    """``arun(plan={...})`` and ``arun(answer={...})``, which the README documents and which run,
    were type errors (``expected "Plan | bool | None"``, ``"AnswerOptions | None"``)."""
    script = tmp_path / "user.py"
    script.write_text(USER_CODE, encoding="utf-8")
    env = {**os.environ, "MYPYPATH": str(PACKAGE.parent)}  # (this checkout's code, wherever it is installed)
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                              str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert checked.returncode == 0, checked.stdout + checked.stderr
