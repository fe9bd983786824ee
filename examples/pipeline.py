"""Orchestra from Python: one planned task, then a small data set with every call batched.

    python examples/pipeline.py                 # the embedded local pool (offline)
    python examples/pipeline.py examples/pools/openai.yaml
"""

from __future__ import annotations

import sys

from orchestra import Budget, Orchestra, Pool


def main() -> None:
    pool = Pool.load(sys.argv[1]) if len(sys.argv) > 1 else Pool.load()
    orc = Orchestra(pool, k=2, budget=Budget(max_calls=100, max_cost_usd=0.25))

    result = orc.run("Give two facts about the Moon, then say which one matters most for tides.")
    print("answer:", result.answer)
    for node in result.plan.nodes:
        print(f"  [{node.status}] {node.id}: experts {', '.join(node.experts)}; aggregator {node.aggregator}")
        for line in (node.recruitment or {}).get("explanation", []):
            print("      ", line)
    print(f"  {result.usage.calls} calls, ${result.usage.cost_usd:.4f}, loads {result.model_loads}")

    questions = ["What is 7 * 8?", "Name the largest planet.", "What does CPU stand for?"]
    for question, answer in zip(questions, orc.run_many(questions, plan=False)):
        print(f"{question} -> {answer.answer!r} (experts {', '.join(answer.node('answer').experts)})")
    orc.close()


if __name__ == "__main__":
    main()
