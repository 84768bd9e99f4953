"""A small English grammar whose sentences carry four known attributes.

Every sentence names one *subject* (an animal), one *colour*, one *action* and one *place*, in one
of a few templates::

    the red fox sleeps in the garden.
    in the barn, the grey owl sings.
    the dog in the cave is black and dancing.

Eight values per attribute and five templates give 8**4 * 5 = 20,480 distinct sentences.
:func:`make_corpus` draws distinct ones deterministically from a seed; :func:`parse_sentence`
reads the attributes back from a sentence of the grammar (None when the text is not one), and
:func:`attribute_hits` counts how many given attributes a free text names unambiguously, which is how the demo
scores text generated from a latent. Word forms never collide across attributes and no attribute
word occurs in the templates, so a word identifies its attribute and value.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["ATTRIBUTES", "VALUES", "TEMPLATES", "Sentence", "render", "make_corpus", "parse_sentence",
           "words_to_attributes", "attribute_matches", "attribute_hits", "write_jsonl", "read_jsonl"]

ATTRIBUTES = ("subject", "colour", "action", "place")

SUBJECTS = ("fox", "cat", "dog", "owl", "bear", "rabbit", "horse", "frog")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")
# action: (third person singular, present participle)
ACTIONS = {"sleep": ("sleeps", "sleeping"), "run": ("runs", "running"), "sing": ("sings", "singing"),
           "eat": ("eats", "eating"), "jump": ("jumps", "jumping"), "wait": ("waits", "waiting"),
           "dance": ("dances", "dancing"), "hide": ("hides", "hiding")}
PLACES = ("garden", "forest", "kitchen", "river", "meadow", "barn", "market", "cave")

VALUES: Dict[str, tuple] = {"subject": SUBJECTS, "colour": COLOURS, "action": tuple(ACTIONS),
                            "place": PLACES}

# {s} subject, {c} colour, {a} action (3rd person), {ing} action (participle), {p} place
TEMPLATES = (
    "the {c} {s} {a} in the {p}.",
    "a {c} {s} {a} near the {p}.",
    "in the {p}, the {c} {s} {a}.",
    "the {s} in the {p} is {c} and {ing}.",
    "there is a {c} {s} {ing} by the {p}.",
)

# word form -> (attribute, value)
_FORMS: Dict[str, tuple] = {}
for _s in SUBJECTS:
    _FORMS[_s] = ("subject", _s)
for _c in COLOURS:
    _FORMS[_c] = ("colour", _c)
for _lemma, (_a3, _ing) in ACTIONS.items():
    _FORMS[_a3] = ("action", _lemma)
    _FORMS[_ing] = ("action", _lemma)
for _p in PLACES:
    _FORMS[_p] = ("place", _p)
_TEMPLATE_WORDS = {w for t in TEMPLATES for w in re.findall(r"[a-z]+", t)}
assert not _TEMPLATE_WORDS & set(_FORMS), "a template word doubles as an attribute word"

_WORD = re.compile(r"[a-z]+")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key in ("s", "c", "a", "ing", "p"):
        pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>[a-z]+)")
    return re.compile(pattern)


_TEMPLATE_RES = tuple(_template_regex(t) for t in TEMPLATES)


@dataclass(frozen=True)
class Sentence:
    text: str
    subject: str
    colour: str
    action: str
    place: str
    template: int

    @property
    def attributes(self) -> Dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}


def render(subject: str, colour: str, action: str, place: str, template: int = 0) -> Sentence:
    """The sentence of the grammar with these attributes, in template ``template``."""
    for name, value in zip(ATTRIBUTES, (subject, colour, action, place)):
        if value not in VALUES[name]:
            raise ValueError(f"{name}={value!r} is not in the grammar; choose one of {VALUES[name]}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template={template} must be in [0, {len(TEMPLATES)})")
    a3, ing = ACTIONS[action]
    text = TEMPLATES[template].format(s=subject, c=colour, a=a3, ing=ing, p=place)
    return Sentence(text, subject, colour, action, place, template)


def _combination(index: int) -> tuple:
    """Decode an index in [0, 8**4 * len(TEMPLATES)) into (subject, colour, action, place, template)."""
    out = []
    for name in ATTRIBUTES:
        vals = VALUES[name]
        index, r = divmod(index, len(vals))
        out.append(vals[r])
    return (*out, index)


def n_sentences() -> int:
    """How many distinct sentences the grammar has."""
    n = len(TEMPLATES)
    for name in ATTRIBUTES:
        n *= len(VALUES[name])
    return n


def make_corpus(n: int, seed: int = 0) -> List[Sentence]:
    """``n`` distinct sentences, drawn uniformly without replacement; the same for the same seed."""
    total = n_sentences()
    if not 1 <= n <= total:
        raise ValueError(f"the grammar has {total} distinct sentences; ask for 1..{total}, got {n}")
    order = np.random.default_rng(seed).permutation(total)[:n]
    return [render(*_combination(int(i))) for i in order]


def parse_sentence(text: str) -> Optional[Dict[str, str]]:
    """The attributes of a sentence of the grammar (with its template index under ``template``),
    or None when ``text`` is not exactly one of its sentences (surrounding whitespace ignored)."""
    text = text.strip()
    for k, rx in enumerate(_TEMPLATE_RES):
        m = rx.fullmatch(text)
        if not m:
            continue
        g = m.groupdict()
        try:
            subj, col, place = _FORMS[g["s"]], _FORMS[g["c"]], _FORMS[g["p"]]
            act = _FORMS[g["a"] if "a" in g else g["ing"]]
        except KeyError:
            continue
        if (subj[0], col[0], act[0], place[0]) != ATTRIBUTES:
            continue
        verb = g.get("a") or g.get("ing")
        if verb != ACTIONS[act[1]][0 if "a" in g else 1]:  # the right form for the template
            continue
        return {"subject": subj[1], "colour": col[1], "action": act[1], "place": place[1], "template": k}
    return None


def words_to_attributes(text: str) -> Dict[str, List[str]]:
    """Every attribute value named in a free text, per attribute, in order of appearance."""
    found: Dict[str, List[str]] = {name: [] for name in ATTRIBUTES}
    for w in _WORD.findall(text.lower()):
        hit = _FORMS.get(w)
        if hit and hit[1] not in found[hit[0]]:
            found[hit[0]].append(hit[1])
    return found


def attribute_matches(text: str, attributes: Dict[str, str]) -> Dict[str, bool]:
    """Per attribute: the text names the given value and no other value of that attribute (a
    text that lists several colours has not said which one)."""
    named = words_to_attributes(text)
    return {name: named[name] == [attributes[name]] for name in ATTRIBUTES}


def attribute_hits(text: str, attributes: Dict[str, str]) -> int:
    """How many of the four ``attributes`` the text names unambiguously (0..4)."""
    return sum(attribute_matches(text, attributes).values())


def write_jsonl(path: str | Path, sentences: Iterable[Sentence]) -> Path:
    """One JSON object per line: text, the four attributes and the template index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps(asdict(s)) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> List[Sentence]:
    with open(path, encoding="utf-8") as f:
        return [Sentence(**json.loads(line)) for line in f if line.strip()]


def longest(sentences: Sequence[Sentence], tokenizer) -> int:
    """The longest token count among ``sentences`` under ``tokenizer`` (``encode_batch``)."""
    return max(len(ids) for ids in tokenizer.encode_batch([s.text for s in sentences]))
