"""A1111 prompt syntax: extra-network tags, emphasis, BREAK, prompt editing/alternation, AND (a1111-api.md §9).

The pieces are pure text functions so the API layer can validate prompts and the engine can reason about
them without a model:

* ``parse_extra_networks`` removes ``<lora:...>``, ``<lyco:...>``, ``<hypernet:...>`` tags and returns them typed;
* ``prompt_schedule`` expands ``[from:to:when]`` and ``[a|b]`` into (last step, plain prompt) pairs;
* ``parse_attention`` turns emphasis into (text, weight) fragments with ``BREAK`` markers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pipelines.types import InvalidRequestError

logger = logging.getLogger(__name__)

_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
_AND_RE = re.compile(r"\bAND\b(?!_PERP|_SALT|_TOPK)")
BREAK = "BREAK"
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraCall:
    """``<lora:name:te[:unet[:dyn]]>``; ``unet`` defaults to ``te`` as in A1111."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass(frozen=True)
class HypernetCall:
    name: str
    multiplier: float = 1.0


@dataclass
class ExtraNetworks:
    """Extra networks referenced by a prompt, in order of appearance, plus tags we could not interpret."""

    loras: list[LoraCall] = field(default_factory=list)
    hypernets: list[HypernetCall] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loras or self.hypernets)


def _weight(tag: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError("prompt", f"weight {value!r} in {tag} is not a number") from None


def parse_extra_networks(prompt: str) -> tuple[str, ExtraNetworks]:
    """Strip extra-network tags from ``prompt``; return the clean text and the typed calls.

    Follows A1111: positional args split on ``:``, ``key=value`` args are named (``te=``, ``unet=``,
    ``dyn=``); a missing unet weight equals the te weight; ``lyco`` is an alias of ``lora``.
    """
    found = ExtraNetworks()

    def take(match: re.Match[str]) -> str:
        kind, args_text = match.group(1).lower(), match.group(2)
        tag = match.group(0)
        positional: list[str] = []
        named: dict[str, str] = {}
        for arg in args_text.split(":"):
            key, eq, value = arg.partition("=")
            if eq and key.strip().isidentifier():
                named[key.strip().lower()] = value.strip()
            else:
                positional.append(arg)
        if kind in LORA_KINDS:
            if not positional or not positional[0].strip():
                raise InvalidRequestError("prompt", f"{tag} names no LoRA")
            name = positional[0].strip()
            te = _weight(tag, named.get("te", positional[1] if len(positional) > 1 else "1"))
            unet_text = named.get("unet", positional[2] if len(positional) > 2 else None)
            unet = te if unet_text is None else _weight(tag, unet_text)
            found.loras.append(LoraCall(name, te, unet))
        elif kind == "hypernet":
            if not positional or not positional[0].strip():
                raise InvalidRequestError("prompt", f"{tag} names no hypernetwork")
            mult = _weight(tag, named.get("multiplier", positional[1] if len(positional) > 1 else "1"))
            found.hypernets.append(HypernetCall(positional[0].strip(), mult))
        else:
            found.unknown.append(kind)
        return ""

    return _EXTRA_NETWORK_RE.sub(take, prompt), found


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split A1111 composable-diffusion ``AND`` sub-prompts (each may end in ``:weight``)."""
    parts = []
    for piece in _AND_RE.split(prompt):
        text, weight = piece, 1.0
        m = re.search(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", piece)
        if m:
            text, weight = piece[: m.start()], float(m.group(1))
        parts.append((text.strip(), weight))
    return parts


def join_and(prompt: str) -> tuple[str, bool]:
    """Composable diffusion is not available with diffusers: join sub-prompts as separate BREAK chunks.

    Returns the joined prompt and whether ``AND`` was present (the engine reports it as a warning).
    """
    parts = split_and(prompt)
    if len(parts) == 1:
        return prompt, False
    return " BREAK ".join(text for text, _ in parts if text), True


# -- prompt editing / alternation ---------------------------------------------------------------

@dataclass
class _Scheduled:
    before: list
    after: list
    when: float


@dataclass
class _Alternate:
    options: list[list]


class _ScheduleParser:
    """Recursive-descent parser for A1111's ``[from:to:when]`` and ``[a|b]`` (other brackets stay text).

    Nodes are strings, ``_Scheduled`` or ``_Alternate``; a bracket group that is neither is kept literally
    (it is emphasis, handled later by ``parse_attention``).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list:
        nodes = self._sequence(stop="")
        if self.pos != len(self.text):
            raise ValueError("unbalanced")
        return nodes

    def _sequence(self, stop: str) -> list:
        nodes: list = []
        buf: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                buf.append(self.text[self.pos:self.pos + 2])
                self.pos += 2
                continue
            if ch in stop:
                break
            if ch == "[":
                if buf:
                    nodes.append("".join(buf))
                    buf = []
                nodes.append(self._bracket())
                continue
            if ch == "(":
                buf.append(ch)
                self.pos += 1
                inner = self._sequence(stop=")")
                if self.pos >= len(self.text):
                    raise ValueError("unbalanced")
                if buf:
                    nodes.append("".join(buf))
                    buf = []
                nodes.extend(inner)
                buf.append(")")
                self.pos += 1
                continue
            if ch in ")]":
                raise ValueError("unbalanced")
            buf.append(ch)
            self.pos += 1
        if buf:
            nodes.append("".join(buf))
        return nodes

    def _bracket(self):
        start = self.pos
        self.pos += 1
        groups: list[list] = [self._sequence(stop=":|]")]
        seps: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] in ":|":
            seps.append(self.text[self.pos])
            self.pos += 1
            groups.append(self._sequence(stop=":|]"))
        if self.pos >= len(self.text):
            raise ValueError("unbalanced")
        self.pos += 1  # the closing ]
        if seps and all(s == "|" for s in seps):
            return _Alternate(groups)
        if seps and all(s == ":" for s in seps) and len(groups) in (2, 3):
            when_text = "".join(n for n in groups[-1] if isinstance(n, str)).strip()
            if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", when_text) and all(isinstance(n, str) for n in groups[-1]):
                before = groups[0] if len(groups) == 3 else []
                after = groups[1] if len(groups) == 3 else groups[0]
                return _Scheduled(before, after, float(when_text))
        return self.text[start:self.pos]  # plain "[...]" emphasis: keep for parse_attention


def _switch_steps(nodes: list, steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = node.when
            out.add(int(when * steps) if when < 1 else int(when))
            _switch_steps(node.before, steps, out)
            _switch_steps(node.after, steps, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _switch_steps(option, steps, out)


def _render(nodes: list, step: int, steps: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            end = int(node.when * steps) if node.when < 1 else int(node.when)
            parts.append(_render(node.before if step <= end else node.after, step, steps))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt schedule: ``[(last_step, text), ...]`` covering steps 1..steps.

    ``[from:to:when]`` switches after step ``when`` (a fraction < 1 means that share of ``steps``);
    ``[a|b]`` alternates every step. Unparseable prompts are used as they are, as A1111 does.
    """
    try:
        nodes = _ScheduleParser(prompt).parse()
    except ValueError:
        return [(steps, prompt)]
    boundaries: set[int] = set()
    _switch_steps(nodes, steps, boundaries)
    ends = sorted({b for b in boundaries if 0 < b < steps} | {steps})
    schedule: list[tuple[int, str]] = []
    for end in ends:
        text = _render(nodes, end, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


# -- emphasis -----------------------------------------------------------------------------------

_ATTENTION_TOKEN_RE = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Emphasis fragments with A1111 semantics: ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)``; ``BREAK`` → ("BREAK", -1).

    Escaped brackets are literal; unclosed brackets apply to the rest of the prompt; neighbours with the
    same weight are merged. An empty prompt gives ``[("", 1.0)]``.
    """
    fragments: list[list] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def scale(start: int, factor: float) -> None:
        for frag in fragments[start:]:
            frag[1] *= factor

    for m in _ATTENTION_TOKEN_RE.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\") and len(token) == 2:
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_starts.append(len(fragments))
        elif token == "[":
            square_starts.append(len(fragments))
        elif weight is not None and round_starts:
            try:
                scale(round_starts.pop(), float(weight))
            except ValueError:
                fragments.append([token, 1.0])
        elif token == ")" and round_starts:
            scale(round_starts.pop(), 1.1)
        elif token == "]" and square_starts:
            scale(square_starts.pop(), 1 / 1.1)
        else:
            pieces = _BREAK_RE.split(token)
            for i, piece in enumerate(pieces):
                if i > 0:
                    fragments.append([BREAK, -1.0])
                fragments.append([piece, 1.0])
    for start in round_starts:
        scale(start, 1.1)
    for start in square_starts:
        scale(start, 1 / 1.1)
    if not fragments:
        return [("", 1.0)]
    merged: list[list] = []
    for frag in fragments:
        if merged and merged[-1][1] == frag[1] and frag[0] != BREAK and merged[-1][0] != BREAK:
            merged[-1][0] += frag[0]
        else:
            merged.append(list(frag))
    return [(t, w) for t, w in merged]


def referenced_words(text: str, names: list[str]) -> list[str]:
    """Names (embedding file stems) that occur in ``text`` as whole words, in the order given.

    A cheap text pre-filter: the conditioning step then matches the embeddings at token level as A1111
    does, and only the files referenced here are read from disk.
    """
    lowered = text.lower()
    found = []
    for name in names:
        key = name.lower()
        if key and key in lowered and re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", lowered):
            found.append(name)
    return found
