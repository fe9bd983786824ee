"""The wheel carries agents/, skills/ and prompts/, and an installed package finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_the_data_and_the_installed_package_finds_it(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = list((tmp_path / "dist").glob("skill_orchestra-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("orchestra/_data/agents/pools/local.yaml", "orchestra/_data/prompts/planner.j2",
                     "orchestra/_data/prompts/keywords.j2", "orchestra/_data/prompts/expert.j2",
                     "orchestra/_data/prompts/aggregator.j2", "orchestra/_data/skills/datasets/local-val.jsonl",
                     "orchestra/_data/skills/profiles/local/generalist.json", "orchestra/cli.py"):
        assert required in names, required
    assert not any(name.endswith((".gguf", ".db")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "orchestra = orchestra.cli:command_line" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import orchestra, orchestra.resources as r\n"
        "from orchestra import Pool\n"
        "from orchestra.prompts import render\n"
        f"assert str(r.data_root()).startswith({str(site)!r}), r.data_root()\n"
        "pool = Pool.load()\n"
        "assert pool.name == 'local' and len(pool.profiles) == 5, pool.profiles\n"
        "assert 'Break the task' in render('planner.j2', task='t', max_nodes=2, context='')\n"
        "print('ok', r.data_root())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
