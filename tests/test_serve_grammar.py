"""The prompt grammar a served model states (core/codecs/prompt_grammar.py): the toy world's, shipped beside its
tokenizer, is the world's own prompts exactly, and a prompt outside it gets warnings that name the wrong part."""

from __future__ import annotations

import json

import pytest

from core.codecs.prompt_grammar import GRAMMAR_FILE, PromptGrammar, Slot
from core.config import REPO_ROOT
from toyworld.world import VOCABULARY, all_attributes, grammar, write_grammar

SHIPPED = REPO_ROOT / "assets" / "toyworld" / "tokenizer"


def test_the_shipped_grammar_is_current_and_makes_exactly_the_worlds_prompts(tmp_path):
    write_grammar(tmp_path)
    assert (tmp_path / GRAMMAR_FILE).read_text() == (SHIPPED / GRAMMAR_FILE).read_text(), \
        "assets/toyworld/tokenizer/prompt_grammar.json is stale: rewrite it with toyworld.world.write_grammar"
    shipped = PromptGrammar.find(SHIPPED)
    assert shipped == grammar()
    world = {a.prompt for a, _ in all_attributes()}
    assert all(shipped.warnings(p) == [] for p in world)
    # every prompt one word away from a world prompt: accepted exactly when it is one
    words = sorted(set(VOCABULARY)) + ["static", "corgi", "teal"]
    checked = 0
    for prompt in sorted(world)[::25]:
        base = prompt.split()
        for i in range(len(base)):
            for word in words:
                changed = " ".join(base[:i] + [word] + base[i + 1:])
                assert (shipped.warnings(changed) == []) == (changed in world), changed
                checked += 1
    assert checked > 5000


@pytest.mark.parametrize("prompt, says", [
    ("a red triangle moves slowly down across a blue background",
     ["word 9, 'blue', is a shape colour, not a background (this model's backgrounds: black, gray, brown)"]),
    ("a pink circle stays still on a red background",
     ["word 2, 'pink', is not a shape colour this model knows", "word 8, 'red', is a shape colour, not a background"]),
    ("a red circle moves left across a gray background", ["word 5, 'left', is a direction, not a speed"]),
    ("a red circle", ["the prompt stops after 3 word(s), where 'moves' or 'stays' comes next"]),
    ("a red circle stays still on a gray background today", ["word 10, 'today', comes after the end of a prompt"]),
    ("a red square on a teal background", ["word 4 is 'on' where this model's prompts have 'moves' or 'stays'"]),
])
def test_a_prompt_outside_the_grammar_is_told_which_part(prompt, says):
    warnings = grammar().warnings(prompt)
    assert len(warnings) == len(says)
    for warning, part in zip(warnings, says):
        assert warning.startswith("the prompt is outside the model's grammar: ") and part in warning, warning
    assert grammar().warnings("  A Red CIRCLE stays still on a GRAY background ") == []


def test_a_model_without_a_grammar_has_none_and_a_bad_grammar_file_says_so(tmp_path):
    assert PromptGrammar.find(None) is None and PromptGrammar.find(tmp_path) is None
    (tmp_path / GRAMMAR_FILE).write_text(json.dumps({"templates": ["a <colour> dog"], "slots": {}}))
    with pytest.raises(ValueError, match=r"prompt_grammar.json is not a prompt grammar .*undefined slots \['<colour>'\]"):
        PromptGrammar.find(tmp_path)
    with pytest.raises(ValueError, match="lower-case single words"):
        PromptGrammar(("a <x>",), {"x": Slot("thing", ("Big dog",))})
