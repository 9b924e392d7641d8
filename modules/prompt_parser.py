r"""Prompt-syntax parsing, ported from AUTOMATIC1111's ``modules/prompt_parser.py``.

This module is pure Python (it needs only ``lark``, never ``torch``) so that the
prompt syntax can be parsed, tested and shown in the UI without loading a model.
The torch-side functions (``get_learned_conditioning``, ``reconstruct_cond_batch``
and friends) live elsewhere and build on the data structures defined here.

The outputs match A1111 exactly, including its quirks; the few places where this
port deliberately differs are marked "Differs from A1111" below.

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

import re
from collections import namedtuple
from collections.abc import Iterable, Sequence
from typing import Any

import lark

__all__ = [
    "schedule_parser",
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
]


# --------------------------------------------------------------------------------------
# Prompt editing ([from:to:when]) and alternation ([a|b|c])
# --------------------------------------------------------------------------------------

# A1111's grammar, verbatim. The Earley parser's ambiguity resolution is what decides
# which brackets are emphasis, scheduling or alternation, so the grammar must not be
# "improved" or the outputs would drift from A1111's.
schedule_parser = lark.Lark(r"""
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
""")


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
    the prompt gets the single schedule entry ``[[steps, prompt]]``; this never raises.

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

    def collect_steps(steps: int, tree: lark.Tree) -> list[int]:
        # Every step at which some part of the prompt changes, plus the last step.
        res = [steps]

        class CollectSteps(lark.Visitor):
            def scheduled(self, tree: lark.Tree) -> None:
                s = tree.children[-2]  # the NUMBER token
                v = float(s)
                if use_old_scheduling:
                    v = v * steps if v < 1 else v
                else:
                    if "." in s:
                        v = (v - flt_offset) * steps
                    else:
                        v = v - int_offset
                # Replaced in place with the int step so that AtStep can compare to it.
                tree.children[-2] = min(steps, int(v))
                if tree.children[-2] >= 1:
                    res.append(tree.children[-2])

            def alternate(self, tree: lark.Tree) -> None:
                res.extend(range(1, steps + 1))

        CollectSteps().visit(tree)
        return sorted(set(res))

    def at_step(step: int, tree: lark.Tree) -> str:
        # The prompt text as it reads at sampling step `step` (1-based).
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                def flatten(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for gen in x:
                            yield from flatten(gen)

                return "".join(flatten(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                for child in children:
                    yield child

        return AtStep().transform(tree)

    def get_schedule(prompt: str) -> list[list[int | str]]:
        if "[" not in prompt:
            # Fast path, same output: without "[" there is no scheduled/alternate node, and
            # every parse (or parse error) gives back the prompt unchanged. It also avoids
            # the Earley parser's blow-up on long runs of "(" (minutes for 2000 of them).
            return [[steps, prompt]]
        try:
            tree = schedule_parser.parse(prompt)
            return [[t, at_step(t, tree)] for t in collect_steps(steps, tree)]
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        except (ArithmeticError, ValueError, RecursionError):
            # Differs from A1111: A1111 only catches LarkError around parse(), so e.g.
            # "[a:b:1e999]" (int(inf) -> OverflowError) raised there. We use the
            # prompt literally instead, as for any other unusable syntax.
            return [[steps, prompt]]

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
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def _split_weight(subprompt: str) -> tuple[str, float]:
    # A trailing ":number" on an AND-part is that part's weight; whitespace around it
    # (and at the end) is dropped, leading whitespace of the text is kept (as A1111).
    match = re_weight.search(subprompt)
    text, weight = match.groups() if match is not None else (subprompt, 1.0)
    weight = float(weight) if weight is not None else 1.0
    return text, weight


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

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


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

    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

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
            multiply_range(round_brackets.pop(), multiplier)
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    # merge runs of identical weights
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res


if __name__ == "__main__":
    import doctest

    doctest.testmod(optionflags=doctest.NORMALIZE_WHITESPACE)
