"""Byte-level NFAs built by Thompson construction, and their lazy determinization.

The grammars of constrained decoding (json_schema_grammar.py, constraints.py) are built from the
combinators below. Symbols are ints: bytes 0..255, and larger values for control tokens, which
are single symbols.

Invariant the constraint masks rely on: every state lies on a path from its fragment's start to
its end (combinators only ever join whole fragments, and no label set is empty), so every DFA
state other than DEAD can still reach the final state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

Frag = tuple[int, int]  # (start state, end state)
MAX_STATES = 300_000
DEAD = -1


class GrammarError(ValueError):
    """A grammar that cannot be built: a malformed schema, or more than max_states states."""


class Nfa:
    """States are ints; `edges[s]` are (symbol set, target) pairs, `eps[s]` epsilon targets."""

    def __init__(self, max_states: int = MAX_STATES) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[frozenset[int], int]]] = []
        self.max_states = max_states

    def state(self) -> int:
        if len(self.eps) >= self.max_states:
            raise GrammarError(f"the grammar needs more than {self.max_states} states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def edge(self, a: int, symbols: frozenset[int], b: int) -> None:
        assert symbols, "an empty label would create a dead end"
        self.edges[a].append((symbols, b))

    # Fragment combinators. Each call builds new states: a fragment is used exactly once.

    def symbols(self, symbols: frozenset[int]) -> Frag:
        a, b = self.state(), self.state()
        self.edge(a, symbols, b)
        return a, b

    def literal(self, data: Iterable[int]) -> Frag:
        start = end = self.state()
        for symbol in data:
            nxt = self.state()
            self.edge(end, frozenset((symbol,)), nxt)
            end = nxt
        return start, end

    def seq(self, frags: Sequence[Frag]) -> Frag:
        if not frags:
            s = self.state()
            return s, s
        for (_, end), (start, _) in pairwise(frags):
            self.eps[end].append(start)
        return frags[0][0], frags[-1][1]

    def alt(self, frags: Sequence[Frag]) -> Frag:
        assert frags, "an empty alternative would create a dead end"
        if len(frags) == 1:
            return frags[0]
        a, b = self.state(), self.state()
        for start, end in frags:
            self.eps[a].append(start)
            self.eps[end].append(b)
        return a, b

    def optional(self, frag: Frag) -> Frag:
        a, b = self.state(), self.state()
        self.eps[a] += [frag[0], b]
        self.eps[frag[1]].append(b)
        return a, b

    def repeat(self, make: Callable[[], Frag], lo: int, hi: int, sep: Callable[[], Frag]) -> Frag:
        """lo..hi copies of make(), separated by sep(); `hi` copies at most, so it stays finite."""
        end = self.state()
        start = cur = self.state()
        for i in range(hi):
            if i >= lo:
                self.eps[cur].append(end)
            parts = [sep(), make()] if i else [make()]
            first, last = self.seq(parts)
            self.eps[cur].append(first)
            cur = last
        self.eps[cur].append(end)
        return start, end


class LazyDfa:
    """The subset construction, done on demand: a DFA state is the epsilon-closed set of NFA
    states reachable by the symbols so far, interned to an int; transitions are memoised.
    Not thread-safe: one owner (the event loop of a service) steps it."""

    def __init__(self, nfa: Nfa, frag: Frag) -> None:
        self._nfa, self._final = nfa, frag[1]
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._next: dict[tuple[int, int], int] = {}
        self.start = self._intern(self._closure([frag[0]]))

    def step(self, state: int, symbol: int) -> int:
        key = (state, symbol)
        found = self._next.get(key)
        if found is None:
            edges = self._nfa.edges
            targets = [t for s in self._sets[state] for label, t in edges[s] if symbol in label]
            found = self._intern(self._closure(targets)) if targets else DEAD
            self._next[key] = found
        return found

    def walk(self, state: int, symbols: Iterable[int]) -> int:
        for symbol in symbols:
            state = self.step(state, symbol)
            if state == DEAD:
                break
        return state

    def accepting(self, state: int) -> bool:
        return state != DEAD and self._final in self._sets[state]

    def finished(self, state: int) -> bool:
        """Accepting with no way to continue: the whole grammar has been produced."""
        return self.accepting(state) and not any(self._nfa.edges[s] for s in self._sets[state])

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(seen)
        eps = self._nfa.eps
        while stack:
            for t in eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def _intern(self, states: frozenset[int]) -> int:
        found = self._ids.get(states)
        if found is None:
            found = self._ids[states] = len(self._sets)
            self._sets.append(states)
        return found
