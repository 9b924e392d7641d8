r"""Prompt-syntax parsing, ported from AUTOMATIC1111's ``modules/prompt_parser.py``.

This module is pure Python (no ``torch``, no parser library) so that the prompt syntax can
be parsed, tested and shown in the UI without loading a model. The torch-side functions
(``get_learned_conditioning``, ``reconstruct_cond_batch`` and friends) live elsewhere and
build on the data structures defined here.

The outputs match A1111's, including its quirks; the few places where this port
deliberately differs are marked "Differs from A1111" below.

Every function here takes time linear in the length of its input (a prompt is user text,
and a server must answer any of it quickly): A1111 parses prompt editing with a lark
Earley parser, which takes seconds for a few hundred brackets (and minutes for a
thousand), and a few of its regular expressions are quadratic on long runs of spaces.
This port reads the same grammar with one left-to-right pass instead (see
``A1111_SCHEDULE_GRAMMAR``), and ``check_prompt`` refuses, before a job is queued, what
no real prompt needs: see ``MAX_PROMPT_LENGTH`` and its neighbours.

A prompt like this:
"fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
is represented (with 100 steps) by this schedule:
[25, 'fantasy landscape with a mountain and an oak in foreground shoddy']
[50, 'fantasy landscape with a lake and an oak in foreground in background shoddy']
[60, 'fantasy landscape with a lake and an oak in foreground in background masterful']
[75, 'fantasy landscape with a lake and an oak in background masterful']
[100, 'fantasy landscape with a lake and a christmas tree in background masterful']
"""

from __future__ import annotations

import heapq
import math
import re
from bisect import bisect_right
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

from modules.errors import InvalidParameter

__all__ = [
    "A1111_SCHEDULE_GRAMMAR",
    "get_learned_conditioning_prompt_schedules",
    "ScheduledPromptConditioning",
    "SdConditioning",
    "ComposableScheduledPromptConditioning",
    "MulticondLearnedConditioning",
    "re_AND",
    "re_weight",
    "split_and",
    "get_multicond_prompt_list",
    "active_schedule_index",
    "re_attention",
    "re_break",
    "parse_prompt_attention",
    "PromptTooComplex",
    "MAX_PROMPT_LENGTH",
    "MAX_NESTING",
    "MAX_AND_PARTS",
    "MAX_BREAKS",
    "check_prompt",
]


# --------------------------------------------------------------------------------------
# Prompt editing ([from:to:when]) and alternation ([a|b|c])
# --------------------------------------------------------------------------------------

# A1111's grammar, verbatim: the definition of the syntax that the parser below reads.
A1111_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def __getattr__(name: str) -> Any:
    # `schedule_parser`, A1111's lark parser of the grammar above, built on first use: nothing
    # here uses it (it is the slow reference the tests compare the linear parser with).
    if name == "schedule_parser":
        import lark

        parser = lark.Lark(A1111_SCHEDULE_GRAMMAR)
        globals()["schedule_parser"] = parser
        return parser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# lark's SIGNED_NUMBER terminal, as lark compiles it (so `when` reads exactly as in A1111).
_re_number = re.compile(
    r"(?:(?:\+|\-))?(?:(?:(?:[0-9])+(?:e|E)(?:(?:\+|\-))?(?:[0-9])+|(?:(?:[0-9])+\.(?:(?:[0-9])+)?|\.(?:[0-9])+)"
    r"(?:(?:e|E)(?:(?:\+|\-))?(?:[0-9])+)?)|(?:[0-9])+)")
_re_spaces = re.compile(r"\s*")
# The grammar's tokens that are not plain text: an escape (backslash + any character but a
# newline: the grammar's `\\.`), a backslash that escapes nothing, and the syntax characters.
_re_schedule_token = re.compile(r"\\[^\n]|\\|[\[\]():|]")


class _Scheduled:
    """`[before:after:when]`; `before` is None for `[after:when]`. `when` is set per step count."""

    __slots__ = ("before", "after", "number", "when")

    def __init__(self, before: list | None, after: list, number: str) -> None:
        self.before, self.after, self.number, self.when = before, after, number, 0


class _Alternate:
    """`[a|b|...]`: one list of pieces per option."""

    __slots__ = ("options",)

    def __init__(self, options: list[list]) -> None:
        self.options = options


class _Unparsable(Exception):
    """The grammar has no parse for the prompt: it is used literally."""


def _when_number(tail: list) -> str | None:
    # The text after a scheduled group's last ":" must be `[WHITESPACE] NUMBER [WHITESPACE]`
    # (so no group in it).
    if not all(isinstance(piece, str) for piece in tail):
        return None
    text = "".join(tail)
    m = _re_number.match(text, _re_spaces.match(text).end())
    if m is None or _re_spaces.match(text, m.end()).end() != len(text):
        return None
    return m.group(0)


def _parse_schedule_syntax(text: str) -> list:
    """The prompt as pieces: strings (text as it reads at every step) and scheduled/alternate nodes.

    One pass with a stack of open brackets, so linear in the length of the text. The grammar
    lets a bracket group (``(...)``, ``(...:...)``, ``[...]``, ``[...:when]``, ``[...|...]``)
    hold only well-formed groups, while outside every group any of ``[]():`` may stand alone
    as text. So the group that starts at an opening bracket, if any, ends at the matching
    closer, and is well-formed only if everything inside is; a closer that does not match
    ends every group still open (each of them would contain a stray closer), and those
    brackets become text. A ``|`` outside an alternation, or a backslash that escapes
    nothing, leaves the grammar with no parse at all: ``_Unparsable``.

    Differs from A1111: here every well-formed group keeps its meaning, wherever it is. Where
    A1111's grammar can read a prompt in two ways (a well-formed group right before stray
    brackets, as in ``[a:1]((``, can also be read as text), lark's Earley parser picks one by
    the order of its internal sets: with A1111's lark 1.1.2 that order, and so the schedule,
    changes from one process to the next (PYTHONHASHSEED), and lark 1.3 picks by the parity
    of the number of stray brackets. Prompts without stray brackets have a single reading,
    the one returned here.
    """
    top: list = []
    stack: list[list] = []  # open groups: [opener, parts (lists of pieces), separators]
    cur = top  # where text goes: the last part of the innermost open group, or the top level

    def close_all_open() -> None:
        # Every open group is not a group after all: its brackets and separators are text,
        # the well-formed groups inside it stay groups.
        for opener, parts, seps in stack:
            if "|" in seps:
                raise _Unparsable  # a "|" can only stand inside an alternation
            top.append(opener)
            for k, part in enumerate(parts):
                if k:
                    top.append(seps[k - 1])
                top.extend(part)
        stack.clear()

    pos = 0
    for m in _re_schedule_token.finditer(text):
        start = m.start()
        if start > pos:
            cur.append(text[pos:start])
        pos = m.end()
        c = text[start]
        if c == "\\":
            if pos - start == 1:
                raise _Unparsable
            cur.append(text[start:pos])  # escapes stay for the attention parser
        elif c == "(" or c == "[":
            cur = []
            stack.append([c, [cur], []])
        elif c == ":" or c == "|":
            if stack:
                stack[-1][2].append(c)
                cur = []
                stack[-1][1].append(cur)
            elif c == "|":
                raise _Unparsable
            else:
                top.append(c)
        else:  # ")" or "]"
            if not stack:
                top.append(c)
                continue
            opener, parts, seps = stack[-1]
            result = None
            # An emphasized group reads the same at every step: its pieces stay as one nested
            # list (no copying, so deep nesting stays linear), flattened by _flatten.
            if opener == "(" and c == ")":
                if "|" not in seps and len(seps) <= 1:  # (p) or (p:p)
                    result = ["(", parts[0], ":", parts[1], ")"] if seps else ["(", parts[0], ")"]
            elif opener == "[" and c == "]":
                if not seps:
                    result = ["[", parts[0], "]"]
                elif ":" not in seps:
                    result = _Alternate(parts)
                elif "|" not in seps and len(seps) <= 2:
                    number = _when_number(parts[-1])
                    if number is not None:
                        result = _Scheduled(parts[0] if len(seps) == 2 else None, parts[-2], number)
            if result is None:
                close_all_open()
                top.append(c)
                cur = top
                continue
            stack.pop()
            cur = stack[-1][1][-1] if stack else top
            cur.append(result)
    if pos < len(text):
        cur.append(text[pos:])
    close_all_open()
    return _flatten(top)


def _flatten(pieces: list) -> list:
    # Nested lists (emphasized groups) expanded and adjacent strings joined, in the top list
    # and in every node's lists, so that pieces are strings and nodes only. Iterative.
    def flat(lst: list) -> list:
        out: list = []
        text: list[str] = []
        todo = [iter(lst)]
        while todo:
            for piece in todo[-1]:
                if isinstance(piece, str):
                    text.append(piece)
                elif isinstance(piece, list):
                    todo.append(iter(piece))
                    break
                else:
                    if text:
                        out.append("".join(text))
                        text = []
                    out.append(piece)
                    nodes.append(piece)
            else:
                todo.pop()
        if text:
            out.append("".join(text))
        return out

    nodes: list[_Scheduled | _Alternate] = []
    result = flat(pieces)
    while nodes:
        node = nodes.pop()
        if isinstance(node, _Scheduled):
            if node.before is not None:
                node.before = flat(node.before)
            node.after = flat(node.after)
        else:
            node.options = [flat(option) for option in node.options]
    return result


def _nodes(pieces: list) -> Iterator[_Scheduled | _Alternate]:
    # Every scheduled/alternate node, nested ones too (without recursion: nesting is unbounded).
    todo = [pieces]
    while todo:
        for piece in todo.pop():
            if isinstance(piece, _Scheduled):
                yield piece
                if piece.before is not None:
                    todo.append(piece.before)
                todo.append(piece.after)
            elif isinstance(piece, _Alternate):
                yield piece
                todo.extend(piece.options)


def _texts_at_steps(pieces: list, steps: list[int]) -> list[str]:
    # The prompt as it reads at each sampling step of `steps` (1-based), as A1111's AtStep
    # transformer: a scheduled node reads `before` while step <= when, then `after`; an
    # alternation reads option (step - 1) % n. Computed a piece list at a time for all the
    # steps together (joins and zips run in C), children before parents, without recursion.
    count = len(steps)
    order: list[list] = []  # every piece list, parents before children
    todo = [pieces]
    while todo:
        lst = todo.pop()
        order.append(lst)
        for piece in lst:
            if isinstance(piece, _Scheduled):
                if piece.before is not None:
                    todo.append(piece.before)
                todo.append(piece.after)
            elif isinstance(piece, _Alternate):
                todo.extend(piece.options)
    # A list's texts: one str if the same at every step, else a list with one str per step.
    texts: dict[int, str | list[str]] = {}
    pickers: dict[int, Callable] = {}  # n -> options -> the option at each step
    for lst in reversed(order):
        columns: list[str | list[str]] = []  # texts that change with the step, between joined static text
        static: list[str] = []
        for piece in lst:
            if isinstance(piece, str):
                static.append(piece)
                continue
            if isinstance(piece, _Scheduled):
                before = texts[id(piece.before)] if piece.before is not None else ""
                after = texts[id(piece.after)]
                if isinstance(before, str) and before == after:
                    static.append(before)
                    continue
                k = bisect_right(steps, piece.when)  # steps is sorted: `before` for the first k
                if isinstance(before, str) and isinstance(after, str):
                    choices = [before] * k + [after] * (count - k)
                else:
                    choices = [(before if i < k else after) for i in range(count)]
                    choices = [c if isinstance(c, str) else c[i] for i, c in enumerate(choices)]
            else:
                options = [texts[id(option)] for option in piece.options]
                n = len(options)
                if n not in pickers:
                    picks = [(step - 1) % n for step in steps]
                    pickers[n] = (itemgetter(*picks) if count > 1 else
                                  lambda options, i=picks[0]: (options[i],))  # type: ignore[misc]
                choices = pickers[n](options)
                if not all(isinstance(option, str) for option in options):
                    choices = [c if isinstance(c, str) else c[i] for i, c in enumerate(choices)]
            if static:
                columns.append("".join(static))
                static = []
            columns.append(choices)
        if not columns:
            texts[id(lst)] = "".join(static)
            continue
        if static:
            columns.append("".join(static))
        texts[id(lst)] = ["".join(row) for row in zip(*[repeat(c, count) if isinstance(c, str) else c
                                                         for c in columns])]
    result = texts[id(pieces)]
    return [result] * count if isinstance(result, str) else result


def get_learned_conditioning_prompt_schedules(
    prompts: Sequence[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[list[int | str]]]:
    r"""Expand prompt editing and alternation into a per-prompt schedule.

    The text encoder only sees plain text, so each prompt is turned into a list of
    ``[end_at_step, text]`` pairs: ``text`` is used for every sampling step up to and
    including ``end_at_step`` (steps counted from 1 here; see ``active_schedule_index``).

    Syntax (A1111's):
      ``[from:to:when]``, ``[to:when]`` (``from`` empty), ``[from::when]`` (``to`` empty);
      ``when`` containing a ``.`` is a fraction of the steps, otherwise an absolute step
      (with ``use_old_scheduling`` any value < 1 is a fraction instead); nesting works;
      ``[a|b|c]`` uses option ``(step - 1) % n`` at each step, and options may be empty.

    ``hires_steps``: when given (and not ``use_old_scheduling``) the schedule is for the
    hires pass: fractions are taken as ``when - 1.0`` of ``hires_steps`` and integers as
    ``when - base_steps``, so ``[a:b:1.5]`` switches halfway through the hires pass.

    Malformed syntax (unbalanced brackets, non-numeric ``when``...) is used literally:
    brackets that do not form a well-formed group are text; a ``|`` outside an
    alternation makes the whole prompt literal (the single entry ``[[steps, prompt]]``).
    This never raises, and takes time linear in the prompt's length (times the number of
    distinct steps in the schedule, for the texts it returns).

    >>> g = lambda p: get_learned_conditioning_prompt_schedules([p], 10)[0]
    >>> g("test")
    [[10, 'test']]
    >>> g("a [b:3]")
    [[3, 'a '], [10, 'a b']]
    >>> g("a [b: 3]")
    [[3, 'a '], [10, 'a b']]
    >>> g("a [[[b]]:2]")
    [[2, 'a '], [10, 'a [[b]]']]
    >>> g("[(a:2):3]")
    [[3, ''], [10, '(a:2)']]
    >>> g("a [b : c : 1] d")
    [[1, 'a b  d'], [10, 'a  c  d']]
    >>> g("a[b:[c:d:2]:1]e")
    [[1, 'abe'], [2, 'ace'], [10, 'ade']]
    >>> g("a [unbalanced")
    [[10, 'a [unbalanced']]
    >>> g("a [b:.5] c")
    [[5, 'a  c'], [10, 'a b c']]
    >>> g("a [{b|d{:.5] c")  # A1111's doctest expects [[5, 'a  c'], [10, 'a {b|d{ c']] but is stale
    [[10, 'a [{b|d{:.5] c']]
    >>> g("((a][:b:c [d:3]")
    [[3, '((a][:b:c '], [10, '((a][:b:c d']]
    >>> g("[a|(b:1.1)]")
    [[1, 'a'], [2, '(b:1.1)'], [3, 'a'], [4, '(b:1.1)'], [5, 'a'], [6, '(b:1.1)'], [7, 'a'], [8, '(b:1.1)'], [9, 'a'], [10, '(b:1.1)']]
    >>> g("[fe|]male")
    [[1, 'female'], [2, 'male'], [3, 'female'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'female'], [8, 'male'], [9, 'female'], [10, 'male']]
    >>> g("[fe|||]male")
    [[1, 'female'], [2, 'male'], [3, 'male'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'male'], [8, 'male'], [9, 'female'], [10, 'male']]
    >>> g = lambda p: get_learned_conditioning_prompt_schedules([p], 10, 10)[0]
    >>> g("a [b:.5] c")
    [[10, 'a b c']]
    >>> g("a [b:1.5] c")
    [[5, 'a  c'], [10, 'a b c']]
    """

    if hires_steps is None or use_old_scheduling:
        int_offset = 0
        flt_offset = 0.0
        steps = base_steps
    else:
        int_offset = base_steps
        flt_offset = 1.0
        steps = hires_steps

    def get_schedule(prompt: str) -> list[list[int | str]]:
        if "[" not in prompt:
            # Fast path, same output: without "[" there is no scheduled/alternate node.
            return [[steps, prompt]]
        try:
            pieces = _parse_schedule_syntax(prompt)
        except _Unparsable:
            return [[steps, prompt]]
        # Every step at which some part of the prompt changes, plus the last step.
        res = {steps}
        try:
            for node in _nodes(pieces):
                if isinstance(node, _Alternate):
                    if len(res) < steps:
                        res.update(range(1, steps + 1))
                    continue
                s = node.number
                v = float(s)
                if use_old_scheduling:
                    v = v * steps if v < 1 else v
                elif "." in s:
                    v = (v - flt_offset) * steps
                else:
                    v = v - int_offset
                node.when = min(steps, int(v))
                if node.when >= 1:
                    res.add(node.when)
        except (ArithmeticError, ValueError):
            # Differs from A1111: A1111 only catches parse errors, so e.g. "[a:b:1e999]"
            # (int(inf) -> OverflowError) raised there. We use the prompt literally instead,
            # as for any other unusable syntax.
            return [[steps, prompt]]
        at = sorted(res)
        return [[t, text] for t, text in zip(at, _texts_at_steps(pieces, at))]

    promptdict = {prompt: get_schedule(prompt) for prompt in set(prompts)}
    return [promptdict[prompt] for prompt in prompts]


# --------------------------------------------------------------------------------------
# Pure-data structures shared with the torch-side conditioning code
# --------------------------------------------------------------------------------------

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ScheduledPromptConditioning.__doc__ = (
    "One entry of a prompt's schedule: `cond` is used for sampling steps up to and including "
    "`end_at_step` (see active_schedule_index for the step convention)."
)


class SdConditioning(list):
    """A list of prompts for the conditioner model that also carries image metadata.

    Kept as in A1111: SDXL's conditioner needs the target width/height and whether the
    prompts are negative, and this metadata has to survive the AND-splitting done by
    ``get_multicond_prompt_list`` (whose flat prompt list is an ``SdConditioning``).
    """

    def __init__(
        self,
        prompts: Iterable[str],
        is_negative_prompt: bool = False,
        width: int | None = None,
        height: int | None = None,
        copy_from: Any = None,
    ) -> None:
        super().__init__()
        self.extend(prompts)

        if copy_from is None:
            copy_from = prompts

        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class ComposableScheduledPromptConditioning:
    """One AND-part of a prompt: its schedule of conds and its composition weight.

    Composable diffusion sums the per-part predictions weighted by ``weight``, so the
    weight travels alongside the part's schedule.
    """

    def __init__(self, schedules: list[ScheduledPromptConditioning], weight: float = 1.0) -> None:
        self.schedules: list[ScheduledPromptConditioning] = schedules
        self.weight: float = weight

    def __repr__(self) -> str:
        return f"ComposableScheduledPromptConditioning(schedules={self.schedules!r}, weight={self.weight!r})"


class MulticondLearnedConditioning:
    """The conditioning for a whole batch: for each prompt, the list of its AND-parts.

    ``shape`` is only there because samplers (DDIM/PLMS) read ``cond.shape``; it is
    ``(batch_size,)`` in A1111.
    """

    def __init__(self, shape: tuple, batch: list[list[ComposableScheduledPromptConditioning]]) -> None:
        self.shape: tuple = shape  # the shape field is needed to send this object to DDIM/PLMS
        self.batch: list[list[ComposableScheduledPromptConditioning]] = batch

    def __repr__(self) -> str:
        return f"MulticondLearnedConditioning(shape={self.shape!r}, batch={self.batch!r})"


def active_schedule_index(schedule_end_steps: Sequence[int], step: int) -> int:
    """Index of the schedule entry in force at sampling step ``step``.

    Convention (as A1111's ``reconstruct_cond_batch``): ``step`` is the 0-based index of
    the current sampling step, and the entry used is the first one with
    ``step <= end_at_step``. Because schedules' ``end_at_step`` values were computed with
    1-based steps, this means a ``[a:b:5]`` edit (entries ``[5, a], [10, b]``) still
    uses ``a`` at 0-based step 5 (the 6th step) and switches to ``b`` at step 6: the
    same off-by-one that A1111 has, kept so that images match.

    Differs from A1111: when ``step`` is past every ``end_at_step`` (possible when a
    sampler evaluates the model more than once per step, or in a hires pass),
    A1111 falls back to index 0 (the *first* entry); this returns the *last* entry,
    i.e. the index is clamped. Raises ``ValueError`` for an empty schedule.
    """
    if len(schedule_end_steps) == 0:
        raise ValueError("active_schedule_index: the schedule is empty")
    for index, end_at_step in enumerate(schedule_end_steps):
        if step <= end_at_step:
            return index
    return len(schedule_end_steps) - 1


# --------------------------------------------------------------------------------------
# AND (composable diffusion)
# --------------------------------------------------------------------------------------

re_AND = re.compile(r"\bAND\b")
# A1111's pattern for an AND-part's trailing ":weight". Kept for reference and for callers;
# `_split_weight` computes the same groups without it, because on a long run of spaces
# its lazy prefix makes it quadratic (11.8 s for "a" + 20,000 spaces + "b").
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
# The end of a part read backwards: a number (digits with at most one "."), a sign, spaces, ":".
_re_weight_reversed = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([-+]?)\s*:")


def _split_weight(subprompt: str) -> tuple[str, float]:
    # A trailing ":number" on an AND-part is that part's weight; whitespace around it
    # (and at the end) is dropped, leading whitespace of the text is kept (as A1111).
    # Same result as re_weight.search(subprompt).groups(), in linear time: the number must
    # reach the end of the text (but for trailing whitespace), so it is matched on the
    # reversed text, anchored at its start.
    text = subprompt.rstrip()  # str.isspace() is exactly re's \s
    m = _re_weight_reversed.match(text[::-1])
    if m is None:
        return text, 1.0
    weight = (m.group(1) + m.group(2))[::-1]
    return text[:len(text) - m.end()].rstrip(), float(weight)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt on ``AND`` into ``(text, weight)`` parts, as composable diffusion does.

    Pure-data helper for callers (UI, token counters) that need the parts without the
    de-duplicated indexing of ``get_multicond_prompt_list``.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    return [_split_weight(subprompt) for subprompt in re_AND.split(prompt)]


def get_multicond_prompt_list(
    prompts: Sequence[str],
) -> tuple[list[list[tuple[int, float]]], list[str], dict[str, int]]:
    """Split every prompt on ``AND`` and de-duplicate the parts across the batch.

    Returns ``(res_indexes, prompt_flat_list, prompt_indexes)``: for each prompt the list
    of ``(index into prompt_flat_list, weight)``; the unique part texts (an
    ``SdConditioning``, a ``list`` subclass that keeps ``prompts``' metadata); and the
    text -> index map. Identical parts share one index so each is encoded only once.
    """
    res_indexes: list[list[tuple[int, float]]] = []

    prompt_indexes: dict[str, int] = {}
    prompt_flat_list = SdConditioning(prompts)
    prompt_flat_list.clear()

    for prompt in prompts:
        indexes = []
        for text, weight in split_and(prompt):
            index = prompt_indexes.get(text, None)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index

            indexes.append((index, weight))

        res_indexes.append(indexes)

    return res_indexes, prompt_flat_list, prompt_indexes


# --------------------------------------------------------------------------------------
# Attention / emphasis: (x), [x], (x:w), BREAK
# --------------------------------------------------------------------------------------

re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

# A1111's r"\s*\bBREAK\b\s*" splits the same way, but tries its leading \s* at every
# position of a run of spaces (quadratic); this one starts a run only at its first space.
re_break = re.compile(r"(?:(?<!\s)\s+)?\bBREAK\b\s*")

# Above this many weight multiplications (the sum over brackets of the runs they cover),
# parse_prompt_attention multiplies in log space instead: linear, but no longer bit-equal
# to A1111's sequence of float products. check_prompt's limits keep every prompt below it.
_ATTENTION_EXACT_BUDGET = 1_000_000


def _attention_events(text: str) -> tuple[list[list[Any]], list[tuple[int, int, float]]]:
    # A1111's scan, without the multiplications: the runs, and each bracket as
    # (first run, end run, multiplier) in the order A1111 applies them: brackets as they
    # close, then the unclosed round ones, then the unclosed square ones.
    res: list[list[Any]] = []
    events: list[tuple[int, int, float]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)

        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                multiplier = float(weight)
            except ValueError:
                # Differs from A1111 (which raises): a weight like "1.2.3" or "." is not a
                # number, so read the token as if the weight alternative had not matched:
                # ":1.2.3" is plain text and ")" closes the bracket with the usual 1.1.
                res.append([text[:-1], 1.0])
                multiplier = round_bracket_multiplier
            events.append((round_brackets.pop(), len(res), multiplier))
        elif text == ")" and round_brackets:
            events.append((round_brackets.pop(), len(res), round_bracket_multiplier))
        elif text == "]" and square_brackets:
            events.append((square_brackets.pop(), len(res), square_bracket_multiplier))
        elif "BREAK" not in text:
            res.append([text, 1.0])
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        events.append((pos, len(res), round_bracket_multiplier))

    for pos in square_brackets:
        events.append((pos, len(res), square_bracket_multiplier))

    return res, events


def _multiply_in_log_space(res: list[list[Any]], events: list[tuple[int, int, float]]) -> None:
    # Each run's weight times the product of the multipliers of the brackets around it, via
    # prefix sums of log|m| (and counts of zero, infinite and negative multipliers).
    n = len(res)
    logs = [0.0] * (n + 1)
    zeros = [0] * (n + 1)
    infs = [0] * (n + 1)
    negs = [0] * (n + 1)
    for start, end, m in events:
        if m == 0:
            zeros[start] += 1
            zeros[end] -= 1
        elif math.isinf(m):
            infs[start] += 1
            infs[end] -= 1
        else:
            lg = math.log(abs(m))
            logs[start] += lg
            logs[end] -= lg
        if m < 0:
            negs[start] += 1
            negs[end] -= 1
    lg = 0.0
    z = i = s = 0
    for p in range(n):
        lg += logs[p]
        z += zeros[p]
        i += infs[p]
        s += negs[p]
        if z and i:
            factor = math.nan
        elif z:
            factor = 0.0
        elif i or lg > 709.0:
            factor = math.inf
        else:
            factor = math.exp(lg)
        res[p][1] *= -factor if s % 2 else factor


def parse_prompt_attention(text: str) -> list[list[str | float]]:
    r"""Split a prompt into ``[text, weight]`` runs so the encoder can scale token embeddings.

    Accepted tokens:
      (abc) - increases attention to abc by a multiplier of 1.1
      (abc:3.12) - increases attention to abc by a multiplier of 3.12
      [abc] - decreases attention to abc by a multiplier of 1.1
      \( \) \[ \] \\ - literal characters ( ) [ ] \
      BREAK - its own ``["BREAK", -1]`` entry (forces a new 75-token chunk)
      anything else - just text

    Unclosed brackets are closed at the end; adjacent runs with equal weights are merged;
    the empty prompt gives ``[['', 1.0]]``. Never raises.

    As in A1111, a ``BREAK`` inside brackets has its -1 multiplied too (e.g. -1.1), and
    the encoder then no longer recognises it as a break.

    The weights are A1111's to the bit (the same float products in the same order). That
    costs the number of runs times the nesting depth; past ``_ATTENTION_EXACT_BUDGET``
    multiplications (thousands of brackets nested thousands deep, which ``check_prompt``
    refuses) the products are taken in log space instead, in linear time.

    >>> parse_prompt_attention('normal text')
    [['normal text', 1.0]]
    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    >>> parse_prompt_attention('(unbalanced')
    [['unbalanced', 1.1]]
    >>> parse_prompt_attention('\(literal\]')
    [['(literal]', 1.0]]
    >>> parse_prompt_attention('(unnecessary)(parens)')
    [['unnecessaryparens', 1.1]]
    >>> parse_prompt_attention('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).')
    [['a ', 1.0],
     ['house', 1.5730000000000004],
     [' ', 1.1],
     ['on', 1.0],
     [' a ', 1.1],
     ['hill', 0.55],
     [', sun, ', 1.1],
     ['sky', 1.4641000000000006],
     ['.', 1.1]]
    """

    res, events = _attention_events(text)

    if sum(end - start for start, end, _ in events) <= _ATTENTION_EXACT_BUDGET:
        for start, end, multiplier in events:
            for p in range(start, end):
                res[p][1] *= multiplier
    else:
        _multiply_in_log_space(res, events)

    if len(res) == 0:
        res = [["", 1.0]]

    # merge runs of identical weights (in one pass: A1111's pop(i + 1) loop is quadratic)
    merged: list[list[Any]] = []
    for item in res:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)

    return merged


# --------------------------------------------------------------------------------------
# Limits: what a job's prompt may be, checked before the job is queued
# --------------------------------------------------------------------------------------

# Real prompts: a few thousand characters at most (CLIP reads 75 tokens per chunk, about
# 300 characters), brackets nested fewer than 10 deep, a few AND parts and BREAKs. The
# limits are far beyond that; what they bound is the work a prompt can cause downstream
# (each AND part is one more UNet batch row at every step, each BREAK one more 77-token
# chunk that every cross-attention reads, every bracket one more multiplication per run).
MAX_PROMPT_LENGTH = 20_000  # characters
MAX_NESTING = 50  # brackets open at once
MAX_AND_PARTS = 32
MAX_BREAKS = 100
# The encoder multiplies token embeddings by the weights in float32 at best.
_FLOAT32_MAX = 3.4028234663852886e38
_LOG10_FLOAT32_MAX = math.log10(_FLOAT32_MAX)

# Weights: `:<digits and dots>)` is what A1111 reads as a weight (this one only where it is a
# float; "1.2.3" is text); `1e999`, `inf`, `nan` in weight position are text to A1111 but
# clearly meant as weights.
# (`\d+(?:\.\d*)?`, not `\d+\.?\d*`: two `\d` runs side by side backtrack quadratically.)
_re_a1111_weight_value = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_re_other_weight_value = re.compile(r":\s*([+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)[eE][+-]?\d+|inf(?:inity)?|nan))\s*\)",
                                    re.IGNORECASE)
_re_break_word = re.compile(r"\bBREAK\b")
_re_escaped = re.compile(r"\\[()\[\]\\]")
_re_not_bracket = re.compile(r"[^()\[\]]+")
# The brackets as parse_prompt_attention reads them: (escape, weight of a `:<w>)` closer, bracket).
_re_bracket_token = re.compile(r"(\\[()\[\]\\])|:\s*([+-]?[.\d]+)\s*\)|([()\[\]])")
_LOG10_ROUND = math.log10(1.1)


class PromptTooComplex(InvalidParameter):
    """A prompt beyond the limits that bound the work of parsing and encoding it (HTTP 422)."""


def _nesting_depth(text: str, limit: int) -> int:
    # The most brackets open at once (round + square, closers only close their own kind),
    # as parse_prompt_attention reads them; stops counting once past `limit`.
    openers = text.count("(") + text.count("[")
    if openers <= limit:
        return openers  # an upper bound, enough here
    rounds = squares = depth = 0
    for c in _re_not_bracket.sub("", _re_escaped.sub("", text)):
        if c == "(":
            rounds += 1
        elif c == "[":
            squares += 1
        elif c == ")":
            rounds -= rounds > 0
            continue
        else:
            squares -= squares > 0
            continue
        if rounds + squares > depth:
            depth = rounds + squares
            if depth > limit:
                break
    return depth


def _max_log10_weight(text: str) -> float:
    # An upper bound of log10 |weight| over the runs of one AND part: every round bracket
    # around a run counts with log10 max(|multiplier|, 1) (square brackets only divide), so
    # no partial product exceeds it either. Round brackets nest, so one pass with a stack of
    # "the largest sum inside this bracket" gives the largest sum along any chain.
    inner: list[float] = [0.0]  # inner[0]: the part itself
    for _, weight, bracket in _re_bracket_token.findall(text):
        if bracket == "(":
            inner.append(0.0)
        elif len(inner) > 1 and (weight or bracket == ")"):
            try:
                multiplier = abs(float(weight)) if weight else 1.1
            except ValueError:
                multiplier = 1.1
            value = inner.pop() + (math.log10(multiplier) if multiplier > 1 else 0.0)
            if value > inner[-1]:
                inner[-1] = value
    while len(inner) > 1:  # unclosed: 1.1 each, to the end
        value = inner.pop() + _LOG10_ROUND
        if value > inner[-1]:
            inner[-1] = value
    return inner[0]


def _refuse_weight(text: str, field: str, token: str, value: float) -> None:
    at = text.find(token)
    start = text.rfind("(", max(0, at - 40), at)
    snippet = text[start:at + len(token) + 1] if start >= 0 and len(token) <= 30 else None
    shown = token if len(token) <= 30 else f"{token[:12]}...{token[-6:]} ({len(token)} characters)"
    if not math.isfinite(value):
        where = f' in "{snippet}"' if snippet else ""
        raise InvalidParameter(f"{field}: the emphasis weight {shown}{where} is not a finite number", field=field)
    raise InvalidParameter(f"{field}: the emphasis weight {shown} is beyond the float32 range of the text encoder "
                           f"(at most {_FLOAT32_MAX:.3g})", field=field)


def check_prompt(text: str, field: str = "prompt") -> None:
    """Refuse, before a job is queued, a prompt that cannot be encoded or would cost far too much.

    For ``prompt``, ``negative_prompt``, ``hr_prompt``, ``hr_negative_prompt``... (``field``
    names it in the error). Raises ``InvalidParameter(field=field)`` (HTTP 422) for:
      - text that is not valid Unicode (a lone surrogate such as ``"\ud800"``, which the
        tokenizer cannot encode);
      - an emphasis weight that is not a finite number (``(red:1e999)``, ``(red:nan)``,
        ``(red:inf)``, or 400 digits), a weight (or an AND part's ``:weight``) beyond
        float32's range, or nested weights whose product may exceed it: the encoder
        multiplies embeddings in float32 or less, and the result would be a black image.
        Any finite weight alone is accepted, as in A1111;
      - ``PromptTooComplex`` past ``MAX_PROMPT_LENGTH`` characters, ``MAX_NESTING`` brackets
        open at once, ``MAX_AND_PARTS`` AND parts or ``MAX_BREAKS`` BREAKs.

    Linear in the length of the text, and quick (milliseconds) for any text up to the
    length limit. Malformed syntax is not refused: it is used literally, as in A1111.

    >>> check_prompt("a (red:1.2) [circle:square:0.5] AND blue:0.5")
    >>> check_prompt("(red:1e999)", "negative_prompt")
    Traceback (most recent call last):
    ...
    modules.errors.InvalidParameter: negative_prompt: the emphasis weight 1e999 in "(red:1e999)" is not a finite number
    """
    if not isinstance(text, str):
        raise InvalidParameter(f"{field} must be text, not {type(text).__name__}", field=field)
    if len(text) > MAX_PROMPT_LENGTH:
        raise PromptTooComplex(f"{field} is {len(text)} characters long; at most {MAX_PROMPT_LENGTH} are allowed",
                               field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameter(f"{field} is not valid Unicode: {text[e.start]!r} (a lone surrogate) at character "
                               f"{e.start}", field=field) from None

    # A1111's weights must fit the encoder's float32; what A1111 reads as text there
    # (`(red:1e39)`) is refused only if it is no finite number at all.
    tokens = _re_a1111_weight_value.findall(text)
    values = list(map(float, tokens))
    if values and max(map(abs, values)) > _FLOAT32_MAX:
        k = next(k for k, v in enumerate(values) if abs(v) > _FLOAT32_MAX)
        _refuse_weight(text, field, tokens[k], values[k])
    for token in _re_other_weight_value.findall(text):
        if not math.isfinite(float(token)):
            _refuse_weight(text, field, token, float(token))
    big_weights = [math.log10(abs(v)) for v in values if abs(v) > 1.1]  # nested products need a look

    parts = re_AND.split(text)
    if len(parts) > MAX_AND_PARTS:
        raise PromptTooComplex(f"{field} has {len(parts)} AND parts; at most {MAX_AND_PARTS} are allowed "
                               f"(each one is another UNet evaluation at every step)", field=field)
    breaks = len(_re_break_word.findall(text))
    if breaks > MAX_BREAKS:
        raise PromptTooComplex(f"{field} has {breaks} BREAKs; at most {MAX_BREAKS} are allowed", field=field)

    for part in parts:
        if len(parts) > 1:
            _, and_weight = _split_weight(part)
            if not math.isfinite(and_weight) or abs(and_weight) > _FLOAT32_MAX:
                raise InvalidParameter(f"{field}: an AND part's weight is beyond the float32 range (at most "
                                       f"{_FLOAT32_MAX:.3g})", field=field)
        depth = _nesting_depth(part, MAX_NESTING)
        if depth > MAX_NESTING:
            raise PromptTooComplex(f"{field} nests brackets more than {MAX_NESTING} deep; at most {MAX_NESTING} "
                                   f"are allowed", field=field)
        # A run is inside at most `depth` brackets, each 1.1 or one of the explicit weights: when
        # the `depth` largest of those cannot overflow, no product can; else look closer.
        if (big_weights and depth and depth * _LOG10_ROUND + sum(heapq.nlargest(depth, big_weights))
                > _LOG10_FLOAT32_MAX and _max_log10_weight(part) > _LOG10_FLOAT32_MAX):
            raise InvalidParameter(f"{field}: nested emphasis weights multiply to more than {_FLOAT32_MAX:.3g}, "
                                   f"beyond the float32 range of the text encoder", field=field)

if __name__ == "__main__":
    import doctest

    doctest.testmod(optionflags=doctest.NORMALIZE_WHITESPACE)
