"""Find every user-facing error message in the source and keep the catalogs' ``"messages"`` in step.

``python -m webapp.i18n.extract`` walks the AST of the modules whose messages reach users (the web app, and
the engine / backend / training modules whose errors come back as 4xx answers or a job's error) and turns
each message given to an error into a template: literal text kept, each value (an f-string ``{expr}``, a
``%s``, a ``.format`` field, an ``str(exc)``) becomes ``{0}``, ``{1}`` … in order. A message built by ``+``
or with a conditional part (``a if c else b``, a local variable assigned in branches) gives one template per
variant. ``locales/<language>.json`` then gets every template: existing translations are kept, new templates
are listed with ``null`` (missing), templates no longer in the source are dropped.

    python -m webapp.i18n.extract            # update the catalogs, print what is missing
    python -m webapp.i18n.extract --check    # exit 1 when a template has no translation (CI)
    python -m webapp.i18n.extract --missing ja  # the missing templates of one language, as JSON
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from webapp.i18n.catalog import LOCALES

ROOT = Path(__file__).resolve().parents[2]
TARGET_LANGUAGES = ("zh-CN", "ja")

# Where messages that reach users are raised: the whole web app, and the engine, backend and training
# modules whose errors the services pass on (``InvalidInput(str(exc))``) or that end a job (``Failed``).
SOURCES: tuple[str, ...] = (
    "webapp/**/*.py",
    "pipelines/**/*.py",          # PipelineError / InvalidRequestError: request validation, model files
    "deploy/backends/options.py",  # OptionsError: an endpoint's options, answered 422
    "deploy/sagemaker/control.py",  # PlanError: a SageMaker endpoint plan, passed on as OptionsError
    "deploy/runner.py",            # Failed(...): a generation job's error
    "deploy/training_runner.py",   # Failed(...) / InvalidPayload: a training job's error
)

# Exception classes (and their subclasses, found in the scanned files) whose first argument — or the
# keyword / position named here — is a message for users.
ROOT_CLASSES: dict[str, tuple[int, str]] = {
    "ServiceError": (0, "message"),
    "PipelineError": (0, "message"),
    "InvalidRequestError": (1, "message"),
    "PreprocessorInputError": (0, "message"),
    "MissingAnnotator": (0, "message"),
    "BrokenAnnotator": (0, "message"),
    "OptionsError": (0, "message"),
    "PlanError": (0, "message"),
    "InvalidPayload": (0, "message"),
    "A1111Error": (2, "detail"),
    "HTTPException": (1, "detail"),
}
# Calls that are not exceptions but carry a message: a job's failure, a Gradio popup.
MESSAGE_CALLS: dict[str, tuple[int, str]] = {
    "Failed": (-1, "message"),
    "gr.Error": (0, "message"),
}

# Functions whose returned text is an answer's message (the gate's refusals).
RETURNED_MESSAGES: dict[str, frozenset[str]] = {"webapp/web/origin.py": frozenset({"refusal"})}

_PLACEHOLDER = re.compile(r"\{(\d+)\}")
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(?:\d+|\*)?(?:\.\d+)?[sdirfgexXc]")
_FORMAT_FIELD = re.compile(r"\{\{|\}\}|\{[^{}]*\}")
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass
class Found:
    """The templates found, each with where it is raised (``path:line``)."""

    templates: dict[str, list[str]] = field(default_factory=dict)
    dynamic: list[str] = field(default_factory=list)
    """Sites whose message is only a value (``str(exc)``): the value's own raise site has the template."""

    def add(self, template: str, where: str) -> None:
        self.templates.setdefault(template, []).append(where)


# -- message expressions → templates ---------------------------------------------------------------------------

Piece = tuple[str, ...]  # a template as literal / placeholder pieces; "\0" marks a placeholder


def _literal(text: str) -> Piece:
    return (text,) if text else ()


_VALUE: Piece = ("\0",)


class _Templates:
    """Turns one message expression into its variants, resolving local names in the enclosing function."""

    MAX_VARIANTS = 16

    def __init__(self, assignments: dict[str, list[ast.expr]], inline: frozenset[str] = frozenset(),
                 params: frozenset[str] = frozenset()) -> None:
        self.assignments = assignments
        self.inline = inline  # a message helper's message parameter: its text goes into the template
        self.params = params - inline  # the enclosing function's other parameters: values
        self._resolving: set[str] = set()

    def of(self, node: ast.expr) -> list[Piece]:
        variants = self._of(node)
        return variants[: self.MAX_VARIANTS]

    def _of(self, node: ast.expr) -> list[Piece]:
        if isinstance(node, ast.Constant):
            return [_literal(node.value)] if isinstance(node.value, str) else [_VALUE]
        if isinstance(node, ast.JoinedStr):
            return self._joined(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._product(self._of(node.left), self._of(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _is_str(node.left):
            return [_percent(node.left.value)]  # type: ignore[union-attr]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                and _is_str(node.func.value)):
            return [_format(node.func.value.value)]  # type: ignore[union-attr]
        if isinstance(node, ast.IfExp):
            return self._of(node.body) + self._of(node.orelse)
        if isinstance(node, ast.Name) and node.id in self.assignments and node.id not in self._resolving:
            self._resolving.add(node.id)
            try:
                return [v for value in self.assignments[node.id] for v in self._of(value)]
            finally:
                self._resolving.discard(node.id)
        return [_VALUE]

    def _joined(self, node: ast.JoinedStr) -> list[Piece]:
        variants: list[Piece] = [()]
        for part in node.values:
            if isinstance(part, ast.Constant):
                options = [_literal(str(part.value))]
            elif isinstance(part, ast.FormattedValue) and part.conversion == -1 and part.format_spec is None \
                    and (_is_textual(part.value) or self._conditional(part.value)):
                options = self._of(part.value)  # f"…{'it' if one else 'them'}…": literal variants
            else:
                options = [_VALUE]
            variants = self._product(variants, options)
        return variants

    def _conditional(self, node: ast.expr) -> bool:
        """A local name holding message text chosen by a condition (``hint = " (…)" if c else ""``), or the
        message parameter of a helper: its variants become part of the template."""
        if not isinstance(node, ast.Name) or node.id in self.params or node.id in self._resolving:
            return False
        if node.id in self.inline:
            return True
        values = self.assignments.get(node.id, [])
        return bool(values) and all(_is_str(v) or isinstance(v, ast.JoinedStr) or _is_textual(v) for v in values) \
            and any(_is_str(v) or _is_textual(v) for v in values)

    def _product(self, left: list[Piece], right: list[Piece]) -> list[Piece]:
        return [a + b for a, b in itertools.islice(itertools.product(left, right), self.MAX_VARIANTS)]


def _is_str(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _is_textual(node: ast.expr) -> bool:
    """A value that is itself message text (a conditional between literals), not data."""
    if isinstance(node, ast.IfExp):
        return all(_is_str(b) or isinstance(b, ast.JoinedStr) or _is_textual(b) for b in (node.body, node.orelse))
    return False


def _percent(text: str) -> Piece:
    pieces: list[str] = []
    for index, part in enumerate(_PERCENT.split(text.replace("%%", "\1"))):
        if index:
            pieces.append("\0")
        pieces.append(part.replace("\1", "%"))
    return tuple(p for p in pieces if p)


def _format(text: str) -> Piece:
    pieces: list[str] = []
    last = 0
    for m in _FORMAT_FIELD.finditer(text):
        pieces.append(text[last:m.start()])
        pieces.append({"{{": "{", "}}": "}"}.get(m.group(0), "\0"))
        last = m.end()
    pieces.append(text[last:])
    return tuple(p for p in pieces if p)


def render(piece: Piece) -> str:
    """Pieces → ``"… {0} … {1}"``; adjacent literals joined."""
    out: list[str] = []
    count = 0
    for index, part in enumerate(piece):
        if part == "\0":
            if index and piece[index - 1] == "\0":
                continue  # values side by side ("F16[320, 4]") are one value: nothing tells them apart
            out.append(f"{{{count}}}")
            count += 1
        else:
            out.append(part)
    return "".join(out)


def is_message(template: str) -> bool:
    """A template with words of its own (not ``"{0}"`` or ``"{0}: {1}"``, which would match anything)."""
    return bool(_WORD.search(_PLACEHOLDER.sub("", template)))


# -- walking the source ---------------------------------------------------------------------------------------

def source_files(root: Path = ROOT) -> list[Path]:
    files: set[Path] = set()
    for pattern in SOURCES:
        files.update(p for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    return sorted(files)


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and func.value.id == "gr":
            return f"gr.{func.attr}"
        return func.attr
    return None


def message_classes(trees: Iterable[ast.Module]) -> dict[str, tuple[int, str]]:
    """``ROOT_CLASSES`` and every class in ``trees`` deriving from one (by name), with where its message is;
    a subclass with its own ``__init__(self, message, …)`` takes the message first."""
    bases: dict[str, list[str]] = {}
    own_first: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [n for n in (_call_name(b) for b in node.bases) if n]
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        names = [a.arg for a in item.args.args[1:]]
                        if names[:1] == ["message"]:
                            own_first.add(node.name)
    known = dict(ROOT_CLASSES)
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name in known:
                continue
            parent = next((p for p in parents if p in known), None)
            if parent is not None:
                known[name] = (0, "message") if name in own_first else known[parent]
                changed = True
    return known


def _message_arg(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    if 0 <= position < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[:position + 1]):
        return call.args[position]
    return None


def _assignments(function: ast.AST) -> dict[str, list[ast.expr]]:
    found: dict[str, list[ast.expr]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found.setdefault(node.targets[0].id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found.setdefault(node.target.id, []).append(node.value)
    return found


def _params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = function.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]


MESSAGE_PARAMS = frozenset({"message", "reason", "why", "detail"})


@dataclass(frozen=True)
class _Helper:
    """A function that wraps a message in an error (``_fail(name, message)``): its callers' text is the message."""

    function: ast.FunctionDef | ast.AsyncFunctionDef
    param: str
    position: int  # the parameter's position among the call's arguments (``self`` not counted)
    message: ast.expr  # the message expression of the error it builds, naming ``param``


class _Visitor(ast.NodeVisitor):
    def __init__(self, classes: dict[str, tuple[int, str]], where: str, found: Found | None,
                 helpers: dict[str, _Helper] | None = None) -> None:
        self.classes = classes
        self.where = where
        self.found = found
        self.helpers = helpers or {}
        self.new_helpers: dict[str, _Helper] = {}
        self.class_stack: list[str] = []
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.scopes: list[dict[str, list[ast.expr]]] = [{}]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:  # noqa: N802 - ast.NodeVisitor's naming
        self.class_stack.append(node.name)
        self.generic_visit(node)
        self.class_stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:  # noqa: N802
        self.functions.append(node)
        self.scopes.append(_assignments(node))
        self.generic_visit(node)
        self.scopes.pop()
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        spec = self._spec(node)
        if spec is not None:
            message = _message_arg(node, *spec)
            if message is not None:
                self._found(message, node.lineno)
        helper = self.helpers.get(_call_name(node.func) or "")
        if helper is not None and (not self.functions or self.functions[-1] is not helper.function):
            argument = _message_arg(node, helper.position, helper.param)
            if argument is not None:
                scope = {**self.scopes[-1], **_assignments(helper.function), helper.param: [argument]}
                self._record(_Templates(scope, frozenset({helper.param})).of(helper.message), node.lineno)
        self.generic_visit(node)

    def _spec(self, node: ast.Call) -> tuple[int, str] | None:
        name = _call_name(node.func)
        owner = self.class_stack[-1] if self.class_stack else None
        if owner in self.classes and (name == "cls" or (
                name == "__init__" and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Call) and _call_name(node.func.value.func) == "super")):
            return (0, "message")  # the class builds its own message: super().__init__(f"…"), cls(f"…")
        if name in MESSAGE_CALLS:
            return MESSAGE_CALLS[name]
        return self.classes.get(name) if name else None

    def _found(self, message: ast.expr, line: int) -> None:
        function = self.functions[-1] if self.functions else None
        params = frozenset(_params(function)) if function is not None else frozenset()
        named = {n.id for n in ast.walk(message) if isinstance(n, ast.Name)} & params & MESSAGE_PARAMS
        if function is not None and named:  # a message helper: its callers give the text
            param = sorted(named)[0]
            position = _params(function).index(param) - (1 if _params(function)[:1] in (["self"], ["cls"]) else 0)
            self.new_helpers.setdefault(function.name, _Helper(function, param, position, message))
            return
        self._record(_Templates(self.scopes[-1], params=params).of(message), line)

    def _record(self, variants: list[Piece], line: int) -> None:
        if self.found is None:
            return
        where = f"{self.where}:{line}"
        kept = [t for t in (render(p) for p in variants) if is_message(t)]
        if not kept:
            self.found.dynamic.append(where)
        for template in kept:
            self.found.add(template, where)


def _returned_messages(tree: ast.Module, functions: frozenset[str]) -> Iterator[tuple[ast.expr, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and inner.value is not None and not (
                        isinstance(inner.value, ast.Constant) and inner.value.value is None):
                    yield inner.value, inner.lineno


def extract(root: Path = ROOT) -> Found:
    files = source_files(root)
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in files}
    classes = message_classes(trees.values())
    found = Found()
    for path, tree in trees.items():
        where = path.relative_to(root).as_posix()
        first = _Visitor(classes, where, None)  # which functions of this file wrap a message in an error
        first.visit(tree)
        visitor = _Visitor(classes, where, found, first.new_helpers)
        visitor.visit(tree)
        for value, line in _returned_messages(tree, RETURNED_MESSAGES.get(where, frozenset())):
            variants = [p for p in _Templates({}).of(value) if p != _VALUE]
            visitor._record(variants, line)
    return found


# -- the catalogs ---------------------------------------------------------------------------------------------

def read_catalog(language: str, locales: Path = LOCALES) -> dict:
    path = locales / f"{language}.json"
    if not path.is_file():
        return {"ui": {}, "messages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def merged(templates: Iterable[str], existing: dict[str, str | None]) -> dict[str, str | None]:
    """Every template, sorted, with its existing translation, or None (missing)."""
    return {t: existing.get(t) or None for t in sorted(set(templates))}


def write_catalog(language: str, data: dict, locales: Path = LOCALES) -> None:
    text = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=False) + "\n"
    (locales / f"{language}.json").write_text(text, encoding="utf-8")


def placeholders(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def problems(template: str, translation: str | None) -> list[str]:
    """What is wrong with one translation: missing, or a value dropped or invented."""
    if not translation:
        return ["missing"]
    wanted, given = placeholders(template), placeholders(translation)
    out = [f"drops {{{p}}}" for p in sorted(wanted - given)]
    out += [f"invents {{{p}}}" for p in sorted(given - wanted)]
    return out


def update(root: Path = ROOT, locales: Path = LOCALES, languages: Iterable[str] = TARGET_LANGUAGES,
           ) -> dict[str, dict[str, str | None]]:
    found = extract(root)
    result = {}
    for language in languages:
        data = read_catalog(language, locales)
        data["messages"] = merged(found.templates, data.get("messages", {}))
        data.setdefault("ui", {})
        write_catalog(language, {"ui": data["ui"], "messages": data["messages"]}, locales)
        result[language] = data["messages"]
    return result


def _adjacent(templates: Iterable[str]) -> Iterator[str]:
    """Templates with two values side by side: the split between them cannot be told from the text."""
    return (t for t in templates if re.search(r"\{\d+\}\{\d+\}", t))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m webapp.i18n.extract", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a translation is missing")
    parser.add_argument("--missing", metavar="LANG", help="print the missing templates of LANG as JSON")
    parser.add_argument("--sites", action="store_true", help="list every template with where it is raised")
    args = parser.parse_args(argv)
    found = extract()
    if args.sites:
        for template, sites in sorted(found.templates.items()):
            print(f"{template}\n    {', '.join(sites)}")
        return 0
    if args.check:
        bad = 0
        for language in TARGET_LANGUAGES:
            messages = read_catalog(language).get("messages", {})
            for template in sorted(found.templates):
                for problem in problems(template, messages.get(template)):
                    print(f"{language}: {problem}: {template}")
                    bad += 1
        return 1 if bad else 0
    catalogs = update()
    if args.missing:
        missing = [t for t, v in catalogs[args.missing].items() if not v]
        print(json.dumps(missing, ensure_ascii=False, indent=1))
        return 0
    for language, messages in catalogs.items():
        missing = sum(1 for v in messages.values() if not v)
        print(f"{language}: {len(messages)} templates, {missing} missing")
    for template in _adjacent(found.templates):
        print(f"warning: adjacent values: {template!r} at {', '.join(found.templates[template])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
