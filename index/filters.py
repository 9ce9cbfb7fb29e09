"""Boolean document filters: the paper's hybrid retrieval (section 5, "nn" operator inside
boolean retrieval).

An expression over document attribute terms, e.g.
    type:group AND (city:seattle OR city:portland) AND NOT attributes.tag:spam
is parsed into a tree, evaluated against an attribute inverted index (one roaring bitmap of
internal ids per term, built from `ebr.features.document_filter_terms`), and turned into a FAISS
ID selector that the IVF scan checks before computing a distance. Grammar (NOT binds tighter
than AND, AND tighter than OR; operators are case-insensitive; a term always holds a colon):

    expr := and_expr ("OR" and_expr)*
    and_expr := unary ("AND" unary)*
    unary := "NOT" unary | "(" expr ")" | TERM
    TERM := key ":" value      value may be double-quoted to hold spaces or parentheses

Nesting (parentheses plus NOTs on one path from the root to a term) is limited to `MAX_DEPTH`:
the parser and every walk over the tree recurse, so a deeper expression would exhaust Python's
stack (RecursionError) instead of naming the problem; it is a FilterSyntaxError at the position
where the limit is crossed.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Iterable

import numpy as np
from pyroaring import BitMap

from ebr.features import normalize_text


# Far above any hand-written filter, far below Python's recursion limit (1,000 frames; the parser
# spends 3 per parenthesis).
MAX_DEPTH = 64


class FilterSyntaxError(ValueError):
    """A malformed filter expression; `position` is the 0-based character offset."""

    def __init__(self, expression: str, position: int, message: str):
        self.expression, self.position = expression, position
        pointer = " " * position + "^"
        super().__init__(f"filter syntax error at position {position}: {message}\n"
                         f"  {expression}\n  {pointer}")


# --- parsing -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Term:
    term: str  # normalised "key:value" as document_filter_terms writes it


@dataclasses.dataclass(frozen=True)
class Not:
    child: object


@dataclasses.dataclass(frozen=True)
class And:
    children: tuple


@dataclasses.dataclass(frozen=True)
class Or:
    children: tuple


_OPERATORS = {"AND", "OR", "NOT"}


def normalize_term(term: str) -> str:
    """`City:Seattle ` -> `city:seattle`; keys keep case only under `attributes.` (attribute
    keys are stored as written, values are normalised like features.attribute_terms)."""
    key, _, value = term.partition(":")
    key = key.strip()
    if not key.startswith("attributes."):
        key = key.lower()
    return f"{key}:{normalize_text(value)}"


def term_expression(term: str) -> str:
    """A filter term as the grammar spells it: the value quoted when it holds spaces or
    parentheses (`country:united kingdom` -> `country:"united kingdom"`)."""
    key, _, value = term.partition(":")
    if any(c.isspace() or c in '()' for c in value):
        return f'{key}:"{value}"'
    return term


def _tokens(expr: str):
    """Yields (kind, text, position); kinds: LP, RP, OP, TERM, END."""
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
            continue
        if c in "()":
            yield ("LP" if c == "(" else "RP", c, i)
            i += 1
            continue
        start = i
        buf = []
        while i < n and not expr[i].isspace() and expr[i] not in "()":
            if expr[i] == '"':
                close = expr.find('"', i + 1)
                if close < 0:
                    raise FilterSyntaxError(expr, i, "unterminated quote")
                buf.append(expr[i + 1:close])
                i = close + 1
            else:
                buf.append(expr[i])
                i += 1
        word = "".join(buf)
        if word.upper() in _OPERATORS and '"' not in expr[start:i]:
            yield ("OP", word.upper(), start)
        elif ":" not in word:
            raise FilterSyntaxError(expr, start, f"expected a term key:value or AND/OR/NOT, got {word!r}")
        elif not word.partition(":")[0].strip() or not word.partition(":")[2].strip():
            raise FilterSyntaxError(expr, start, f"term {word!r} needs both a key and a value")
        else:
            yield ("TERM", word, start)
    yield ("END", "", n)


class _Parser:
    def __init__(self, expr: str):
        self.expr = expr
        self.toks = list(_tokens(expr))
        self.i = 0
        self.depth = 0  # parentheses and NOTs open on the current path

    def peek(self):
        return self.toks[self.i]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok, what):
        kind, text, pos = tok
        got = "end of expression" if kind == "END" else repr(text)
        raise FilterSyntaxError(self.expr, pos, f"expected {what}, got {got}")

    def parse(self):
        if self.peek()[0] == "END":
            raise FilterSyntaxError(self.expr, 0, "empty filter expression")
        node = self.or_expr()
        if self.peek()[0] != "END":
            self.fail(self.peek(), "AND, OR or end of expression")
        return node

    def or_expr(self):
        kids = [self.and_expr()]
        while self.peek()[:2] == ("OP", "OR"):
            self.take()
            kids.append(self.and_expr())
        return kids[0] if len(kids) == 1 else Or(tuple(kids))

    def and_expr(self):
        kids = [self.unary()]
        while self.peek()[:2] == ("OP", "AND"):
            self.take()
            kids.append(self.unary())
        return kids[0] if len(kids) == 1 else And(tuple(kids))

    def enter(self, tok) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterSyntaxError(self.expr, tok[2], f"nested deeper than {MAX_DEPTH} "
                                    f"parentheses and NOTs (filters.MAX_DEPTH)")

    def unary(self):
        tok = self.take()
        kind, text, _ = tok
        if kind == "OP" and text == "NOT":
            self.enter(tok)
            node = Not(self.unary())
            self.depth -= 1
            return node
        if kind == "LP":
            self.enter(tok)
            node = self.or_expr()
            if self.peek()[0] != "RP":
                self.fail(self.peek(), "')'")
            self.take()
            self.depth -= 1
            return node
        if kind == "TERM":
            return Term(normalize_term(text))
        self.fail(tok, "a term, NOT or '('")


def parse(expression: str):
    """Expression -> tree of Term / Not / And / Or; FilterSyntaxError names the position."""
    if not isinstance(expression, str):
        raise FilterSyntaxError(str(expression), 0, "filter must be a string")
    return _Parser(expression).parse()


def terms_of(node) -> set[str]:
    if isinstance(node, Term):
        return {node.term}
    if isinstance(node, Not):
        return terms_of(node.child)
    return set().union(*(terms_of(c) for c in node.children))


def matches(node, doc_terms: Iterable[str]) -> bool:
    """Evaluates the tree for one document's terms (brute-force reference, and the ScaNN
    post-filter's semantics)."""
    terms = doc_terms if isinstance(doc_terms, (set, frozenset)) else set(doc_terms)
    if isinstance(node, Term):
        return node.term in terms
    if isinstance(node, Not):
        return not matches(node.child, terms)
    if isinstance(node, And):
        return all(matches(c, terms) for c in node.children)
    return any(matches(c, terms) for c in node.children)


# --- attribute inverted index --------------------------------------------------------------

_MAGIC = b"EBRATTR1"


class AttributeIndex:
    """term -> roaring bitmap of internal ids (row numbers of the index)."""

    def __init__(self, count: int, postings: dict[str, BitMap]):
        self.count = count
        self.postings = postings
        self.universe = BitMap(range(count))

    @classmethod
    def build(cls, filter_terms: list[list[str]]) -> "AttributeIndex":
        lists: dict[str, list[int]] = {}
        for i, terms in enumerate(filter_terms):
            for t in set(normalize_term(t) for t in terms):
                lists.setdefault(t, []).append(i)
        return cls(len(filter_terms), {t: BitMap(ids) for t, ids in lists.items()})

    def evaluate(self, node) -> BitMap:
        if isinstance(node, Term):
            return self.postings.get(node.term, BitMap())
        if isinstance(node, Not):
            return self.universe - self.evaluate(node.child)
        kids = [self.evaluate(c) for c in node.children]
        if isinstance(node, And):
            kids.sort(key=len)  # intersect smallest first
            out = kids[0].copy()
            for k in kids[1:]:
                out &= k
            return out
        return BitMap.union(*kids)

    def select(self, expression: str) -> BitMap:
        return self.evaluate(parse(expression))

    # Serialised as: magic, u64 count, u32 header length, JSON header [[term, offset, size]...],
    # then the concatenated portable roaring bitmaps.
    def to_bytes(self) -> bytes:
        blobs, header, offset = [], [], 0
        for term in sorted(self.postings):
            b = self.postings[term].serialize()
            header.append([term, offset, len(b)])
            blobs.append(b)
            offset += len(b)
        h = json.dumps(header).encode()
        return _MAGIC + struct.pack("<QI", self.count, len(h)) + h + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "filters.bin") -> "AttributeIndex":
        from index.errors import CorruptIndexFile

        try:
            if data[:8] != _MAGIC:
                raise ValueError("bad magic")
            count, hlen = struct.unpack("<QI", data[8:20])
            header = json.loads(data[20:20 + hlen])
            base = 20 + hlen
            postings = {}
            for term, off, size in header:
                blob = data[base + off: base + off + size]
                if len(blob) != size:
                    raise ValueError(f"bitmap of term {term!r} truncated")
                postings[term] = BitMap.deserialize(blob)
        except (ValueError, struct.error, TypeError) as e:
            raise CorruptIndexFile(f"{where}: corrupt attribute index ({e})") from None
        return cls(count, postings)

    def save(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path) -> "AttributeIndex":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), str(path))


# --- FAISS selectors -----------------------------------------------------------------------

class Selection:
    """A compiled filter: the matching internal ids and a FAISS selector over them.

    Keeps the numpy buffers the selector points into alive (FAISS does not copy them)."""

    def __init__(self, ids: BitMap, count: int):
        import faiss

        self.ids = ids
        self.count = count
        self.size = len(ids)
        # A bitmap costs count/8 bytes and one bit test per scanned code; a batch selector
        # (hash set + bloom filter) is smaller for very selective filters.
        if self.size * 64 < count:
            self._arr = np.fromiter(ids, dtype=np.int64, count=self.size)
            self.selector = faiss.IDSelectorBatch(self.size, faiss.swig_ptr(self._arr))
        else:
            bits = np.zeros(count, dtype=bool)
            if self.size:
                bits[np.fromiter(ids, dtype=np.int64, count=self.size)] = True
            self._arr = np.packbits(bits, bitorder="little")
            self.selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(self._arr))

    @property
    def selectivity(self) -> float:
        return self.size / self.count if self.count else 0.0

    def array(self) -> np.ndarray:
        """The selected ids, sorted int64 (computed once)."""
        if getattr(self, "_ids_array", None) is None:
            self._ids_array = np.frombuffer(self.ids.to_array(), dtype=np.uint32).astype(np.int64)
        return self._ids_array

    def mask(self) -> np.ndarray:
        """[count] bool, True where selected (computed once; callers must not modify it)."""
        if getattr(self, "_mask", None) is None:
            m = np.zeros(self.count, dtype=bool)
            m[self.array()] = True
            self._mask = m
        return self._mask


def compile_filter(expression: str, attributes: AttributeIndex) -> Selection:
    return Selection(attributes.select(expression), attributes.count)
