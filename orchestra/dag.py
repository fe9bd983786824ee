"""Dependency graphs: a plan's subtasks or a workflow's steps, with edges dependency -> dependent.

A few dozen lines do what runs need from a graph library (order, cycles, descendants, ancestors),
keeping the nodes in the order they were given: every walk below is deterministic, and nothing
heavy is imported to start a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class Dag:
    """Nodes in their given order and the edges between them.

    Args:
        dependencies: each node's dependencies, every node a key (in the order to keep); a
            dependency named twice is one edge. Each dependency must be a node.
    """

    __slots__ = ("_order", "dependencies", "dependents", "nodes")

    def __init__(self, dependencies: Mapping[str, Iterable[str]]) -> None:
        self.nodes: list[str] = list(dependencies)
        self.dependencies: dict[str, list[str]] = {}
        self.dependents: dict[str, list[str]] = {node: [] for node in self.nodes}
        for node, needs in dependencies.items():  # (a run's start walks every node: one loop, no dedupe unless needed)
            needs = list(needs)
            if len(needs) > 1 and len(set(needs)) < len(needs):
                needs = list(dict.fromkeys(needs))
            self.dependencies[node] = needs
            for dependency in needs:
                self.dependents[dependency].append(node)
        self._order: list[str] | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.dependents

    @property
    def sinks(self) -> list[str]:
        """The nodes nothing depends on, in order."""
        return [node for node in self.nodes if not self.dependents[node]]

    def order(self) -> list[str]:
        """Every node after its dependencies (ties in the given order); ``ValueError`` on a cycle."""
        if self._order is None:
            self._order = self._sorted()
        return list(self._order)

    def _sorted(self) -> list[str]:
        dependents = self.dependents
        waiting = {node: len(needs) for node, needs in self.dependencies.items()}
        ordered = [node for node, needs in waiting.items() if not needs]
        for node in ordered:  # grows while it is read: each node's dependents once all their needs are in
            for dependent in dependents[node]:
                left = waiting[dependent] - 1
                waiting[dependent] = left
                if not left:
                    ordered.append(dependent)
        if len(ordered) < len(self.nodes):
            raise ValueError(f"the graph has a cycle: {' -> '.join(self.cycle() or [])}")
        return ordered

    def cycle(self) -> list[str] | None:
        """A cycle as the path that closes it (first node repeated at the end), or None.

        Found by a depth-first walk from each node in order, along dependents in order, so the
        same graph always names the same cycle."""
        state: dict[str, int] = {}  # 1: on the current path, 2: finished
        for root in self.nodes:
            if root in state:
                continue
            path = [root]
            branches = [iter(self.dependents[root])]
            state[root] = 1
            while branches:
                step = next(branches[-1], None)
                if step is None:
                    state[path.pop()] = 2
                    branches.pop()
                elif state.get(step) == 1:
                    return [*path[path.index(step):], step]
                elif step not in state:
                    state[step] = 1
                    path.append(step)
                    branches.append(iter(self.dependents[step]))
        return None

    def descendants(self, node: str) -> set[str]:
        """The nodes that depend on ``node``, directly or not."""
        return self._reach(node, self.dependents)

    def ancestors(self, node: str) -> set[str]:
        """The nodes ``node`` depends on, directly or not."""
        return self._reach(node, self.dependencies)

    @staticmethod
    def _reach(node: str, edges: dict[str, list[str]]) -> set[str]:
        found: set[str] = set()
        todo = list(edges[node])
        while todo:
            current = todo.pop()
            if current not in found:
                found.add(current)
                todo.extend(edges[current])
        return found
