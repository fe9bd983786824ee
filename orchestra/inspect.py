"""Inspecting stored runs: everything recorded, as a report, as JSON lines, or on the terminal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestra.money import usd_exact
from orchestra.store import EMBEDDINGS, RunStore
from orchestra.terminal_text import counted, printable
from orchestra.view import literal


def run_report(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run, its nodes, every call (request and response), its events and totals. A node's
    ``not_asked`` lists the recruited experts a confident team did not ask, and ``saved_calls``
    the calls that saved (see ``_stopped_early``)."""
    record = store.run(run_id)
    stored = store.result(record.id)
    result = stored.to_json() if stored else None
    stopped = _stopped_early(result)
    nodes = store.nodes(record.id)
    for node in nodes:
        asked, saved, _ = stopped.get(node["node_id"], (node["experts"], 0, None))
        node.update(not_asked=_not_asked(node["experts"], asked), saved_calls=saved)
    return {"run": {"id": record.id, "task": record.task, "item": record.item, "status": record.status,
                    "created": record.created,
                    "updated": record.updated, "resumes": record.resumes, "answer": record.answer,
                    "error": record.error, "config": record.config},
            "totals": store.run_totals(record.id),
            "nodes": nodes,
            "calls": store.calls(record.id),
            "events": list(store.events(record.id)),
            "result": result}


def export_jsonl(store: RunStore, run_id: str) -> Iterator[str]:
    """One JSON object per line: the run, then its nodes, calls and events, each tagged with ``type``."""
    report = run_report(store, run_id)
    yield json.dumps({"type": "run", **report["run"], "totals": report["totals"], "result": report["result"]},
                     ensure_ascii=False)
    for kind, rows in (("node", report["nodes"]), ("call", report["calls"]), ("event", report["events"])):
        for row in rows:
            yield json.dumps({"type": kind, **row}, ensure_ascii=False, default=str)


def _not_asked(recruited: list[str], asked: list[str]) -> list[str]:
    """The recruited experts left once each asked one is taken out (an agent may be recruited twice)."""
    left = list(recruited)
    for agent in asked:
        if agent in left:
            left.remove(agent)
    return left


def _stopped_early(result: dict[str, Any] | None) -> dict[str, tuple[list[str], int, str | None]]:
    """Per node that a confident team ended early: the experts asked, the calls saved, and the aggregator
    its team was recruited with (not asked)."""
    nodes = ((result or {}).get("plan") or {}).get("nodes") or []
    return {node["id"]: ([output["agent"] for output in node.get("expert_outputs") or []], node["saved_calls"],
                         (((node.get("recruitment") or {}).get("team") or {}).get("aggregator")))
            for node in nodes if node.get("saved_calls")}


def _inputs(config: dict[str, Any]) -> list[str]:
    """A workflow run's inputs as lines for the run's panel (a step's prompt is shown as written
    until the step runs, so ``{{ inputs.question }}`` is read against them)."""
    spec = config.get("spec")
    workflow = spec.get("workflow") if isinstance(spec, dict) else None
    inputs = workflow.get("inputs") if isinstance(workflow, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [f"\ninputs.{name}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
            for name, value in inputs.items()]


def _spent(call: dict[str, Any]) -> str:
    """A recorded call's tokens and cost; a request cut off in flight billed what is not known (its
    answer never came): it read ``0+0 tokens · $0.0000``."""
    known = f"{call['prompt_tokens']}+{call['completion_tokens']} tokens · {usd_exact(call['cost_usd'] or 0)}"
    error = call["error"] or ""
    if not call["requests"] or not (error.startswith("CallCancelled: ") and "in flight" in error):
        return known
    if call["prompt_tokens"] or call["completion_tokens"] or call["cost_usd"]:  # (attempts before it were answered)
        return f"{known}, and the cut-off request's unknown"
    return "tokens and cost unknown (cut off in flight)"


def show_run(console: Console, store: RunStore, run_id: str) -> None:
    """Print a run for a person: summary, plan, recruitment explanations, every prompt and response."""
    report = run_report(store, run_id)
    run, totals = report["run"], report["totals"]
    when = datetime.fromtimestamp(run["created"]).strftime("%Y-%m-%d %H:%M:%S")
    resumed = f"  resumed {counted(run['resumes'], 'time')}" if run["resumes"] else ""  # (not "resumed 0x")
    console.print(Panel(Text.assemble(
        (f"{run['id']}  ", "bold"), (run["status"], "green" if run["status"] == "done" else "red"),
        f"  {when}{resumed}\n", printable(f"item {run['item']} · " if run["item"] else ""),
        printable(run["task"]), *map(printable, _inputs(run["config"]))), title="run"))

    stopped = _stopped_early(report["result"])
    plan = Table(title="plan")
    for column in ("node", "status", "needs", "skills", "experts", "aggregator"):
        plan.add_column(column)
    for node in report["nodes"]:
        experts, aggregator = ", ".join(node["experts"]), node["aggregator"] or ""
        early = stopped.get(node["node_id"])
        if early is not None:  # the recruited team, as far as it was asked
            asked, _, recruited = early
            left = node["not_asked"]
            experts = ", ".join(asked) + (f" (not asked: {', '.join(left)})" if left else "")
            aggregator = f"{recruited} (not needed)" if recruited else ""
        plan.add_row(*(literal(cell) for cell in (node["node_id"], node["status"] or "", ", ".join(node["depends_on"]),
                                               ", ".join(node["skills"]), experts, aggregator)))
    console.print(plan)
    for node in report["nodes"]:
        console.print(literal(f"{node['node_id']}: ", style="bold") + literal(node["instruction"] or ""))
    for node_id, (asked, saved, _) in stopped.items():
        skipped = "the other experts and the aggregation" if saved > 1 else "the aggregation"  # (2 experts: none)
        console.print(literal(f"{node_id}: stopped early: its first {len(asked)} experts agreed, so "
                           f"{counted(saved, 'call')} ({skipped}) {'were' if saved > 1 else 'was'} not made"))
    for node in report["nodes"]:
        if node["explanation"]:
            console.print(literal(f"recruitment of {node['node_id']}:", style="bold"))
            for line in node["explanation"]:
                console.print(literal(f"  {line}"))
        if node["error"]:
            console.print(literal(f"{node['node_id']}: {node['error']}", style="red"))

    for index, call in enumerate(report["calls"], start=1):
        # what it cost opens the body, which wraps: in the title a narrow terminal cut it ($0.0000...)
        body = literal(f"{call['source']} · {counted(call['requests'], 'request')} · {_spent(call)}\n", style="dim")
        for message in call["request"].get("messages", []):
            body.append(f"[{message['role']}]\n", style="bold cyan")
            body.append(printable(message["content"] + "\n"))
        if call["purpose"] == EMBEDDINGS:
            body.append(printable(f"embedded to match the keywords: {', '.join(call['request'].get('keywords', []))}"))
        elif call["status"] == "ok":
            body.append("[response]\n", style="bold green")
            body.append(printable((call["response"] or {}).get("text", "")))
        elif call["status"] == "superseded":  # (a resume that finished the run did not ask it again)
            body.append("[error, superseded: the run finished without this request]\n", style="bold yellow")
            body.append(printable(call["error"] or ""))
        else:
            body.append("[error]\n", style="bold red")
            body.append(printable(call["error"] or ""))
        title = literal(f"call {index} · {call['purpose']}{' · ' + call['node'] if call['node'] else ''} · "
                        f"{call['model']}")
        console.print(Panel(body, title=title, title_align="left", border_style="dim"))

    failed = f" ({totals['failed_calls']} failed)" if totals["failed_calls"] else ""
    console.print(literal(f"calls {totals['calls']}{failed} · requests {totals['requests']} · "
                       f"tokens {totals['prompt_tokens']:,} in / {totals['completion_tokens']:,} out · "
                       f"{usd_exact(totals['cost_usd'])}", style="bold"))
    if run["answer"]:
        cut = bool((report["result"] or {}).get("answer_cut"))
        console.print(Panel(literal(run["answer"]), title="answer (stopped at its token limit)" if cut else "answer"))
    if run["error"]:
        console.print(literal(run["error"], style="red"))
