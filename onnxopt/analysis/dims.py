"""Symbolic dimensions: integers, or polynomials with integer coefficients over named atoms.

A dimension (and an element of a shape-like integer tensor) is a plain ``int`` when it is
known, else a ``Sym``: a polynomial such as ``batch``, ``12*batch`` or ``batch*seq + 1``.
Atoms are the model's own symbols (an input's ``dim_param``), fresh symbols for dims
nothing tells (``?3``), and opaque terms that are not polynomials (``floor((H + 1)/2)``,
``max(a, b)``), named by their structure so that two identical strided convolutions of one
input get equal output dims. Two dims are equal when their canonical forms are equal; that
is sound (equal forms are equal numbers) but not complete (unequal forms may still be equal
numbers), so every rule built on it fails closed: "not provably equal" is never "different".

Sign: atoms that stand for a dimension are >= 0 (a dim can be 0: an empty batch). Atoms
that stand for an unknown element of an integer tensor may be negative; their names start
with ``~``. ``nonneg`` uses that to decide ``max(d, 0)`` or ``d == -1`` (a dim is never -1).

Operations on two ints give ints with ONNX's integer semantics (``trunc_div`` truncates as
ONNX integer Div does; ``mod`` takes the divisor's sign as Mod with fmod=0), and a Sym whose
polynomial is a constant turns back into an int, so static models never see a Sym.
"""

from __future__ import annotations

import itertools
from typing import Union

Monomial = tuple  # sorted atom names, repeated for powers: ("b", "b", "s") = b^2*s


class Sym:
    """A polynomial over atoms with integer coefficients (never a constant: that is an int)."""

    __slots__ = ("terms", "_hash")

    def __init__(self, terms: tuple):
        self.terms = terms  # ((monomial, coefficient), ...) sorted by monomial, no zero coefficient
        self._hash = hash(terms)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Sym) and self._hash == other._hash and self.terms == other.terms

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        return f"Sym({self})"

    def __str__(self) -> str:
        parts = []
        for mono, coef in self.terms:
            if not mono:
                parts.append(str(coef))
                continue
            body = "*".join(mono)
            parts.append(body if coef == 1 else f"-{body}" if coef == -1 else f"{coef}*{body}")
        text = " + ".join(parts)
        return text.replace("+ -", "- ")

    @property
    def atoms(self) -> set[str]:
        return {a for mono, _ in self.terms for a in mono}


Dim = Union[int, Sym]

_fresh = itertools.count()


def symbol(name: str) -> Sym:
    """The atom ``name`` as a dim."""
    return Sym((((name,), 1),))


def fresh(prefix: str = "?") -> Sym:
    """A new atom equal to nothing else ("?N" is a dim, >= 0; "~N" an element of any sign)."""
    return symbol(f"{prefix}{next(_fresh)}")


def opaque(text: str, nonneg_: bool) -> Sym:
    """An atom standing for a term that is not a polynomial, named by its structure."""
    return symbol(text if nonneg_ else "~" + text)


def _terms(d: Dim) -> dict:
    if isinstance(d, int):
        return {(): d} if d else {}
    return dict(d.terms)


def _make(terms: dict) -> Dim:
    items = tuple(sorted((m, c) for m, c in terms.items() if c))
    if not items:
        return 0
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    return Sym(items)


def add(a: Dim, b: Dim) -> Dim:
    if type(a) is int and type(b) is int:
        return a + b
    terms = _terms(a)
    for m, c in _terms(b).items():
        terms[m] = terms.get(m, 0) + c
    return _make(terms)


def neg(a: Dim) -> Dim:
    if type(a) is int:
        return -a
    return _make({m: -c for m, c in a.terms})


def sub(a: Dim, b: Dim) -> Dim:
    if type(a) is int and type(b) is int:
        return a - b
    return add(a, neg(b))


def mul(a: Dim, b: Dim) -> Dim:
    if type(a) is int and type(b) is int:
        return a * b
    terms: dict = {}
    for ma, ca in _terms(a).items():
        for mb, cb in _terms(b).items():
            m = tuple(sorted(ma + mb))
            terms[m] = terms.get(m, 0) + ca * cb
    return _make(terms)


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def exact_div(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when the division is exact as polynomials (b an int or a monomial), else None."""
    if type(b) is int:
        if b == 0:
            return None
        if type(a) is int:
            return a // b if a % b == 0 else None
        if all(c % b == 0 for _, c in a.terms):
            return _make({m: c // b for m, c in a.terms})
        return None
    if a == b:
        return 1
    if len(b.terms) != 1:
        # b a polynomial: a = b * q for a monomial q read off the leading terms?
        if type(a) is int:
            return None
        q = exact_div(Sym((a.terms[0],)), Sym((b.terms[0],)))
        return q if q is not None and mul(b, q) == a else None
    (bm, bc), = b.terms
    out = {}
    for m, c in _terms(a).items():
        rest = list(m)
        for atom in bm:
            if atom not in rest:
                return None
            rest.remove(atom)
        if c % bc:
            return None
        out[tuple(rest)] = c // bc
    return _make(out)


def as_dim(a: Dim) -> Dim:
    """``a`` known to be a dimension (>= 0): a polynomial whose sign the algebra cannot see
    (``H - 2``) becomes one non-negative atom named by it, so rules can rely on its sign."""
    if type(a) is int or nonneg(a):
        return a
    return opaque(f"({a})", True)


def nonneg(a: Dim) -> bool:
    """Provably >= 0: an int >= 0, or a polynomial over dim atoms with coefficients >= 0."""
    if type(a) is int:
        return a >= 0
    return all(c >= 0 and not any(x.startswith("~") for x in m) for m, c in a.terms)


def floor_div(a: Dim, k: int) -> Dim:
    """floor(a / k) for an int k > 0: exact when it can be, else an opaque term."""
    return _rounded_div(a, k, "floor", lambda x: x // k)


def ceil_div(a: Dim, k: int) -> Dim:
    """ceil(a / k) for an int k > 0."""
    return _rounded_div(a, k, "ceil", lambda x: -((-x) // k))


def _rounded_div(a: Dim, k: int, name: str, on_int) -> Dim:
    if type(a) is int:
        return on_int(a)
    if k == 1:
        return a
    exact = exact_div(a, k)
    if exact is not None:
        return exact
    return opaque(f"{name}(({a})/{k})", nonneg(a))


def trunc_div(a: Dim, b: Dim) -> Dim:
    """ONNX integer Div (truncates toward zero)."""
    if type(a) is int and type(b) is int:
        if b == 0:
            raise ZeroDivisionError
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    exact = exact_div(a, b)
    if exact is not None:
        return exact
    if type(b) is int and b > 0 and nonneg(a):
        return floor_div(a, b)
    return opaque(f"trunc(({a})/({b}))", nonneg(a) and nonneg(b))


def mod(a: Dim, b: Dim) -> Dim:
    """ONNX integer Mod with fmod=0 (the result takes the divisor's sign, as Python's %)."""
    if type(a) is int and type(b) is int:
        if b == 0:
            raise ZeroDivisionError
        return a % b
    if type(b) is int and b != 0 and exact_div(a, b) is not None:
        return 0
    return opaque(f"mod(({a}), ({b}))", type(b) is int and b > 0)


def maximum(a: Dim, b: Dim) -> Dim:
    if type(a) is int and type(b) is int:
        return max(a, b)
    return _extremum(a, b, "max", nonneg(a) or nonneg(b))


def minimum(a: Dim, b: Dim) -> Dim:
    if type(a) is int and type(b) is int:
        return min(a, b)
    return _extremum(a, b, "min", nonneg(a) and nonneg(b))


# opaque min atoms -> their two arguments (so a broadcast against one argument can be decided)
_MIN_ARGS: dict[Sym, tuple[Dim, Dim]] = {}


def _extremum(a: Dim, b: Dim, name: str, nonneg_: bool) -> Dim:
    decided = compare(a, b)
    if decided is not None:
        bigger, smaller = (a, b) if decided >= 0 else (b, a)
        return bigger if name == "max" else smaller
    first, second = sorted((str(a), str(b)))
    out = opaque(f"{name}({first}, {second})", nonneg_)
    if name == "min":
        _MIN_ARGS.setdefault(out, (a, b))
    return out


def min_args(d: Dim) -> tuple[Dim, Dim] | None:
    """(a, b) when ``d`` is the opaque ``min(a, b)``, else None."""
    return _MIN_ARGS.get(d) if type(d) is Sym else None


def compare(a: Dim, b: Dim) -> int | None:
    """1 if a > b, 0 if equal, -1 if a < b, when provable; else None.

    Provable: equal forms, or a difference that is an int, or a difference d with
    ``nonneg(d)`` (a >= b) and a nonzero constant term (a > b).
    """
    if type(a) is int and type(b) is int:
        return (a > b) - (a < b)
    if a == b:
        return 0
    d = sub(a, b)
    if type(d) is int:
        return (d > 0) - (d < 0)
    constant = dict(d.terms).get((), 0)
    if nonneg(d) and constant > 0:
        return 1
    nd = neg(d)
    if nonneg(nd) and -constant > 0:
        return -1
    return None


def equal(a: Dim, b: Dim) -> bool | None:
    """True/False when provable, else None (a dim atom is never negative)."""
    c = compare(a, b)
    if c is not None:
        return c == 0
    if (type(b) is int and b < 0 and nonneg(a)) or (type(a) is int and a < 0 and nonneg(b)):
        return False
    return None


def is_static(dims) -> bool:
    return dims is not None and all(type(d) is int for d in dims)


def to_text(d: Dim) -> int | str:
    """An int, or the canonical text of a Sym (a ``dim_param``)."""
    return d if type(d) is int else str(d)
