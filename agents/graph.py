"""The dependency graph between an agent's resources: start/stop order and who depends on whom."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


class GraphError(ValueError):
    """An unknown dependency or a cycle; the message names the resources involved."""


class Graph:
    """Resources and their `depends_on` edges, checked once at construction.

    Orders are stable: among resources that could go in any order, config order wins, so the
    start order a user reads in agent.yaml is the one the agent uses.
    """

    def __init__(self, depends_on: Mapping[str, Sequence[str]]) -> None:
        self._deps: dict[str, tuple[str, ...]] = {n: tuple(d) for n, d in depends_on.items()}
        self._check_known()
        self._order = self._toposort()
        self._index = {n: i for i, n in enumerate(self._order)}
        self._dependents: dict[str, list[str]] = {n: [] for n in self._deps}
        for name, deps in self._deps.items():
            for d in deps:
                self._dependents[d].append(name)

    def _check_known(self) -> None:
        problems = [
            f"resource '{name}' depends on unknown resource '{d}'"
            for name, deps in self._deps.items()
            for d in deps
            if d not in self._deps
        ]
        if problems:
            known = ", ".join(sorted(self._deps)) or "none"
            raise GraphError("; ".join(problems) + f" (known resources: {known})")

    def _toposort(self) -> list[str]:
        done: set[str] = set()
        order: list[str] = []
        path: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in path:
                cycle = [*path[path.index(name):], name]
                raise GraphError(
                    "dependency cycle between resources: " + " -> ".join(cycle)
                    + " (remove one of these depends_on entries)"
                )
            path.append(name)
            for d in self._deps[name]:
                visit(d)
            path.pop()
            done.add(name)
            order.append(name)

        for name in self._deps:
            visit(name)
        return order

    @property
    def names(self) -> list[str]:
        return list(self._deps)

    def direct_dependencies(self, name: str) -> tuple[str, ...]:
        return self._deps[name]

    def start_order(self, names: Iterable[str] | None = None) -> list[str]:
        """Dependencies before dependents (all resources, or just `names`)."""
        if names is None:
            return list(self._order)
        return sorted(set(names), key=self._index.__getitem__)

    def stop_order(self, names: Iterable[str] | None = None) -> list[str]:
        """Dependents before dependencies: the reverse of the start order."""
        return list(reversed(self.start_order(names)))

    def dependents(self, name: str) -> list[str]:
        """Everything that depends on `name`, directly or not, in start order."""
        return self.start_order(_reach(self._dependents, name))

    def dependencies(self, name: str) -> list[str]:
        """Everything `name` stands on, directly or not, in start order."""
        return self.start_order(_reach(self._deps, name))


def _reach(edges: Mapping[str, Iterable[str]], name: str) -> set[str]:
    """Every node reachable from `name` along `edges`, `name` itself excepted."""
    seen: set[str] = set()
    todo = list(edges[name])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges[n])
    return seen
