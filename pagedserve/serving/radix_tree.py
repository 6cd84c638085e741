"""An approximate radix tree of one replica's recent prompt text (the SGLang gateway's / vllm-router's
cache-aware routing): it guesses what the replica's prefix cache holds from the text sent to it.

Edges hold strings; a match walks character by character. Every node remembers when it was last
used, and when the tree holds more than `max_chars` characters the least recently used leaves are cut,
as the replica's own cache evicts its least recently used blocks.
"""

from __future__ import annotations

import heapq
import itertools


class _Node:
    __slots__ = ("children", "edge", "parent", "last_used")

    def __init__(self, edge: str, parent: _Node | None, last_used: int) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character of the child's edge → child
        self.last_used = last_used


class RadixTree:
    def __init__(self, max_chars: int = 1 << 20) -> None:
        self.root = _Node("", None, 0)
        self.num_chars = 0
        self.max_chars = max_chars
        self._clock = itertools.count(1)

    def match(self, text: str) -> int:
        """Characters of the longest prefix of `text` in the tree (touches the nodes on the way)."""
        node, i, now = self.root, 0, next(self._clock)
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            k = _common(child.edge, text, i)
            child.last_used = now
            i += k
            if k < len(child.edge):
                break
            node = child
        return i

    def insert(self, text: str) -> None:
        node, i, now = self.root, 0, next(self._clock)
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node, now)
                node.children[text[i]] = leaf
                self.num_chars += len(leaf.edge)
                break
            k = _common(child.edge, text, i)
            if k < len(child.edge):  # split the edge where the texts part
                mid = _Node(child.edge[:k], node, now)
                node.children[text[i]] = mid
                child.edge = child.edge[k:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            child.last_used = now
            i += k
            node = child
        if self.num_chars > self.max_chars:
            self._evict()

    def _evict(self) -> None:
        """Cut least recently used leaves until the tree fits (half a leaf may go: it is approximate)."""
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while self.num_chars > self.max_chars and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.edge[0]]
            self.num_chars -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())


def _common(edge: str, text: str, start: int) -> int:
    n = min(len(edge), len(text) - start)
    k = 0
    while k < n and edge[k] == text[start + k]:
        k += 1
    return k
