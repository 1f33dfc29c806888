"""LaTeX answers: \\boxed{} extraction, normalisation, and equivalence through sympy.

The LaTeX -> sympy conversion is our own small translator (fractions, roots, powers, products, pi,
infinity, common functions), not sympy's `parse_latex` (which needs an ANTLR runtime version that
clashes with Hydra's). Its output is checked against a whitelist of names and characters before
sympy parses it, so an answer string is never evaluated as arbitrary Python, and expressions that
could take long to evaluate (huge or nested powers, long inputs) are compared as strings only.
"""

from __future__ import annotations

import cmath
import random
import re

_BOX_CMDS = ("\\boxed", "\\fbox")


def braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) for the `{` at `start`; None when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept; `\\boxed 5` too)."""
    text = text or ""
    pos = max(text.rfind(cmd) for cmd in _BOX_CMDS)
    while pos >= 0:
        cmd = next(c for c in _BOX_CMDS if text.startswith(c, pos))
        rest = pos + len(cmd)
        j = rest
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = braced(text, j)
            if got is not None:
                return got[0]
        elif j > rest and j < len(text):  # "\boxed 5$"
            return re.split(r"[$\s]", text[j:], maxsplit=1)[0]
        pos = max(text.rfind(c, 0, pos) for c in _BOX_CMDS)
    return None


_UNIT_WORDS = (r"(?:units?|cm|centimeters?|meters?|km|kilometers?|inch(?:es)?|feet|foot|ft|yards?|miles?|"
               r"degrees?|dollars?|cents?|seconds?|minutes?|hours?|days?|weeks?|years?|sq|square|cubic|"
               r"pounds?|lbs?|ounces?|oz|grams?|kg|liters?|mph|people|students?)")
_TRAILING_UNITS = re.compile(rf"^(.*?\d)\s*(?:{_UNIT_WORDS}\b\.?\s*(?:\^?\{{?\d\}}?)?\s*)+$", re.IGNORECASE)
_TEXT_CMDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_math(ans: str) -> str:
    """A canonical string for a MATH answer (in the spirit of Hendrycks et al.'s `is_equiv`)."""
    s = str(ans or "").strip()
    s = s.replace("\n", " ").replace("\\displaystyle", "").replace("~", " ")
    s = re.sub(r"(?<!\\)\\(?:[,;:! ]|q?quad(?![a-zA-Z]))", " ", s)  # spacing, not the "\\" row break
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\text\s*\{\s+[^{}]*\}", "", s)  # "\text{ cm}": a unit after a space
    s = _TEXT_CMDS.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.strip().rstrip(".").strip()
    m = _TRAILING_UNITS.match(s)
    if m:
        s = m.group(1)
    m = re.fullmatch(r"([a-zA-Z]\w*|\\[a-zA-Z]+)\s*=\s*(.+)", s)  # "x = 5" -> "5"
    if m and "=" not in m.group(2):
        s = m.group(2)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt\s*(\d|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"\s+", "", s)
    m = re.fullmatch(r"\(([A-Za-z])\)", s)  # "(C)" -> "C"
    return m.group(1) if m else s


# ------------------------------------------------------------------------------ LaTeX -> sympy syntax

_COMMANDS = {
    "pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "ast": "*",
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log", "log": "log", "exp": "exp",
}
_FUNCS = {"sqrt", "root", "pi", "oo", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
          "log", "exp"}
_SAFE_CHARS = re.compile(r"[0-9a-zA-Z+\-*/().,\s]*")
_MAX_LEN = 200


class _Unsupported(ValueError):
    pass


def _arg(s: str, i: int) -> tuple[str, int]:
    """One macro argument at s[i:]: a braced group, a command, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _Unsupported("missing argument")
    if s[i] == "{":
        got = braced(s, i)
        if got is None:
            raise _Unsupported("unbalanced braces")
        return got
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def latex_to_sympy_syntax(s: str) -> str:
    """'\\frac{1}{2}\\sqrt{3}' -> '((1)/(2))sqrt(3)'; raises ValueError for what it does not know."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if s.startswith("\\frac", i):
            a, i = _arg(s, i + 5)
            b, i = _arg(s, i)
            out.append(f"(({latex_to_sympy_syntax(a)})/({latex_to_sympy_syntax(b)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            if i < len(s) and s[i] == "[":
                j = s.find("]", i)
                if j < 0:
                    raise _Unsupported("unclosed root index")
                n, i = s[i + 1:j], j + 1
                a, i = _arg(s, i)
                out.append(f"root({latex_to_sympy_syntax(a)},{latex_to_sympy_syntax(n)})")
            else:
                a, i = _arg(s, i)
                out.append(f"sqrt({latex_to_sympy_syntax(a)})")
        elif c == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m or m.group(1) not in _COMMANDS:
                raise _Unsupported(f"unknown command {s[i:i + 12]!r}")
            out.append(f" {_COMMANDS[m.group(1)]} ")
            i += m.end()
        elif c == "^":
            a, i = _arg(s, i + 1)
            out.append(f"**({latex_to_sympy_syntax(a)})")
        elif c == "{":
            a, i = _arg(s, i)
            out.append(f"({latex_to_sympy_syntax(a)})")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _to_expr(ans: str):
    """A sympy expression for a normalised answer, or None (unsupported, unsafe or unparsable)."""
    from sympy import Symbol
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    if not ans or len(ans) > _MAX_LEN:
        return None
    try:
        py = latex_to_sympy_syntax(ans)
    except (ValueError, RecursionError):
        return None
    if not _SAFE_CHARS.fullmatch(py) or re.search(r"\.\s*[a-zA-Z_]", py):  # no attribute access
        return None
    names = set(re.findall(r"[a-zA-Z]+", py))
    if any(len(n) > 1 and n not in _FUNCS for n in names):
        return None  # multi-letter words: not an expression we understand
    if py.count("**") > 3 or re.search(r"\*\*\(*[^()]*\d{4,}", py) or re.search(r"\*\*\([^()]*\*\*", py):
        return None  # 9^{9^9}-style powers: too slow to evaluate
    local = {n: Symbol(n) for n in names if len(n) == 1}
    try:
        return parse_expr(py, local_dict=local,
                          transformations=standard_transformations + (implicit_multiplication, convert_xor))
    except Exception:  # noqa: BLE001 - sympy raises many kinds (SyntaxError, TypeError, TokenError, ...)
        return None


def _close(a: complex, b: complex) -> bool:
    return cmath.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _exprs_equal(x, y) -> bool:
    try:
        symbols = sorted(x.free_symbols | y.free_symbols, key=str)
        if not symbols:
            return _close(complex(x.evalf(30)), complex(y.evalf(30)))
        rng = random.Random(0)
        for _ in range(3):  # equal at random points (numbers away from 0 and 1)
            point = {s: rng.uniform(1.3, 2.9) for s in symbols}
            if not _close(complex(x.evalf(30, subs=point)), complex(y.evalf(30, subs=point))):
                return False
        return True
    except Exception:  # noqa: BLE001 - evaluation errors (zoo, nan, unsupported ops): not equal
        return False


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _atom_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _to_expr(a), _to_expr(b)
    return x is not None and y is not None and _exprs_equal(x, y)


def equivalent(pred: str, gold: str) -> bool:
    """Whether two LaTeX answers are the same: normalised strings, else sympy values, else elementwise
    for tuples/intervals/lists with the same brackets. Never raises."""
    try:
        a, b = normalize_math(pred), normalize_math(gold)
        if not a or not b:
            return False
        if a == b:
            return True
        if a[0] in "([{" and b[0] == a[0] and a[-1] in ")]}" and b[-1] == a[-1]:
            a, b = a[1:-1], b[1:-1]
        pa, pb = _split_top(a), _split_top(b)
        if len(pa) != len(pb):
            return False
        return all(_atom_equal(x, y) for x, y in zip(pa, pb, strict=True))
    except Exception:  # noqa: BLE001 - a scorer never crashes the run on odd input
        return False
