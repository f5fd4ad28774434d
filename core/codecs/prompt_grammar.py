"""A model's prompt grammar: the sentences a small world's model was trained on, kept as data beside its tokenizer.

The word-level check (`text_encoder.unknown_words`) says which words a tokenizer cannot read, but a known word in
the wrong place reads as well as any other: "a red triangle moves slowly down across a blue background" has only
known words, yet blue is a shape colour, never a background, and a model trained on the world's prompts plays
whatever it makes of it. A grammar names that part. It is `prompt_grammar.json` in the model's tokenizer folder,
written by the code that writes the tokenizer (the toy world's: `toyworld.world.write_grammar`):

    {"templates": ["a <colour> <shape> stays still on a <background> background", ...],
     "slots": {"colour": {"what": "shape colour", "words": ["red", ...]}, ...}}

Each template is a sentence of words and `<slot>`s; each slot one word of its list. Prompts are compared
lower-cased with whitespace collapsed. A model without the file has no grammar and keeps the word-level check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GRAMMAR_FILE = "prompt_grammar.json"


@dataclass(frozen=True)
class Slot:
    what: str  # what the part is, for a person: "shape colour"
    words: tuple[str, ...]

    def describe(self) -> str:
        return f"a {self.what} ({', '.join(self.words)})"


@dataclass(frozen=True)
class PromptGrammar:
    templates: tuple[str, ...]
    slots: dict[str, Slot]

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("a prompt grammar needs at least one template")
        for template in self.templates:
            if undefined := [t for t in template.split() if _slot_name(t) and _slot_name(t) not in self.slots]:
                raise ValueError(f"template {template!r} uses undefined slots {undefined}; defined: {sorted(self.slots)}")
        for name, slot in self.slots.items():
            if not slot.words or any(w != w.lower() or len(w.split()) != 1 for w in slot.words):
                raise ValueError(f"slot {name!r} must list lower-case single words, got {list(slot.words)}")

    @classmethod
    def from_dict(cls, data: dict) -> "PromptGrammar":
        return cls(tuple(data["templates"]),
                   {name: Slot(s["what"], tuple(s["words"])) for name, s in data["slots"].items()})

    def to_dict(self) -> dict:
        return {"templates": list(self.templates),
                "slots": {name: {"what": s.what, "words": list(s.words)} for name, s in self.slots.items()}}

    def write(self, folder: str | Path) -> None:
        (Path(folder) / GRAMMAR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def find(cls, tokenizer_folder: str | Path | None) -> "PromptGrammar | None":
        """The grammar in a tokenizer folder, or None when it has none (or there is no folder)."""
        if tokenizer_folder is None or not (path := Path(tokenizer_folder) / GRAMMAR_FILE).is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a prompt grammar ({type(e).__name__}: {e}); rewrite it with the code "
                             "that wrote the tokenizer (the toy world's: toyworld.world.write_grammar)") from None

    def warnings(self, prompt: str) -> list[str]:
        """What in `prompt` lies outside the grammar, each part named; empty for a prompt the grammar makes.

        A prompt shaped like a template (its words where the template has words) gets one warning per slot
        holding a word that slot does not take; any other prompt gets one, at the first word no template
        allows there."""
        words = prompt.lower().split()
        shaped = [self._slot_problems(template.split(), words) for template in self.templates
                  if _same_shape(template.split(), words)]
        problems = min(shaped, key=len) if shaped else [self._departure(words)]
        return [f"the prompt is outside the model's grammar: {p}" for p in problems]

    def _slot_problems(self, tokens: list[str], words: list[str]) -> list[str]:
        problems = []
        for i, (token, word) in enumerate(zip(tokens, words)):
            slot = self.slots.get(_slot_name(token) or "")
            if slot is not None and word not in slot.words:
                problems.append(f"word {i + 1}, {word!r}, {self._misfit(word, [slot])}")
        return problems

    def _misfit(self, word: str, expected: list[Slot]) -> str:
        """Why `word` does not fit where the `expected` slots are: what it is instead, when the grammar knows it."""
        wanted = " or ".join(s.what for s in expected)
        elsewhere = [s.what for s in self.slots.values() if word in s.words and s not in expected]
        known = "; ".join(f"{s.what}s: {', '.join(s.words)}" for s in expected)
        if elsewhere:
            return f"is a {' or '.join(elsewhere)}, not a {wanted} (this model's {known})"
        return f"is not a {wanted} this model knows ({known})"

    def _departure(self, words: list[str]) -> str:
        """The first word of `words` that no template allows at its place (or the end that comes too soon)."""
        matched = {template: _matched_prefix(template.split(), words, self.slots) for template in self.templates}
        depth = max(matched.values())
        nexts = list(dict.fromkeys(t.split()[depth] for t, n in matched.items() if n == depth and n < len(t.split())))
        shapes = f"; this model's prompts read {' or '.join(repr(t) for t in self.templates)}"
        if not nexts:
            return f"word {depth + 1}, {words[depth]!r}, comes after the end of a prompt this model knows{shapes}"
        slots = [self.slots[name] for t in nexts if (name := _slot_name(t))]
        literals = [repr(t) for t in nexts if not _slot_name(t)]
        expected = " or ".join(literals + [s.describe() for s in slots])
        if depth == len(words):
            return f"the prompt stops after {depth} word(s), where {expected} comes next{shapes}"
        found = words[depth]
        if slots and not literals:
            return f"word {depth + 1}, {found!r}, {self._misfit(found, slots)}{shapes}"
        return f"word {depth + 1} is {found!r} where this model's prompts have {expected}{shapes}"


def _slot_name(token: str) -> str | None:
    return token[1:-1] if token.startswith("<") and token.endswith(">") else None


def _same_shape(tokens: list[str], words: list[str]) -> bool:
    """The template's words in the same places, any word where it has a slot."""
    return len(tokens) == len(words) and all(_slot_name(t) or t == w for t, w in zip(tokens, words))


def _matched_prefix(tokens: list[str], words: list[str], slots: dict[str, Slot]) -> int:
    """How many leading words the template allows, each slot taking only its own words."""
    n = 0
    for token, word in zip(tokens, words):
        name = _slot_name(token)
        if (word not in slots[name].words) if name else token != word:
            break
        n += 1
    return n
