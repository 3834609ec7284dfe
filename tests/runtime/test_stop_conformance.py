"""Stop strings cut text the same way in both runtimes: tests/conformance/stops.json is a table of cases
(stop strings, the text pieces in order, and what each push delivers) that this test and the JavaScript
runtime's (js/test/conformance.test.js, js/src/generation.js's StopMatcher) both read.

The table's answers are checked here against the definition, not against StopMatcher: after each piece,
all the text so far is searched (str.find); a stop string found ends the text where the earliest one
starts; otherwise everything is delivered except the longest tail that is a proper prefix of a stop string.
Regenerate the table with ``python -m tests.runtime.test_stop_conformance --write``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from rwkv_runtime.generation import StopMatcher

FIXTURE = Path(__file__).resolve().parents[1] / "conformance" / "stops.json"


def by_definition(stops: list, pieces: list) -> tuple[list, str | None]:
    """([text delivered, stopped] per push until a stop, the text released at the end or None if stopped)."""
    stops = [s for s in stops if s]
    text, sent, pushes = "", 0, []
    for p in pieces:
        text += p
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            pushes.append([text[sent : min(found)], True])
            return pushes, None
        hold = max((k for s in stops for k in range(len(s)) if text.endswith(s[:k])), default=0)
        pushes.append([text[sent : len(text) - hold], False])
        sent = len(text) - hold
    return pushes, text[sent:]


def _cases() -> list:
    fixed = [
        ("no stop strings", [], ["Hello", " world"]),
        ("one stop inside a piece", ["\nUser:"], ["Hi there\nUser: more", " text"]),
        ("a stop split over pieces", ["\nUser:"], ["Hi", "\n", "Us", "er", ":", " x"]),
        ("a prefix that turns out not to stop", ["\nUser:"], ["a\n", "Use", "d it", "\n"]),
        ("the held tail released at the end", ["END"], ["abc E", "N"]),
        ("two stops: the earlier-starting one wins", ["bcd", "abcdef"], ["xab", "cdef"]),
        ("the shorter one completing first still cuts at the earlier start", ["abcz", "bc"], ["xa", "bcz"]),
        ("periodic stop (KMP failure table)", ["abab"], ["aba", "bab", "ab"]),
        ("abab then abac", ["abac"], ["ababab", "a", "c"]),
        ("empty pieces (a character still being decoded)", ["ab"], ["x", "", "a", "", "b"]),
        ("empty and duplicate stop strings are ignored", ["", "zz", "zz"], ["az", "", "z!"]),
        ("non-ASCII", ["é\n"], ["caf", "é", "\n", "!"]),
        ("astral characters (surrogate pairs in JS)", ["😀x"], ["a😀", "😀", "y😀", "x tail"]),
        ("a stop string longer than all the text", ["a" * 50 + "b"], ["a" * 20, "a" * 20]),
        ("the stop string is the whole first piece", ["###"], ["###", "more"]),
        ("overlapping stops", ["aa", "aab"], ["caa", "b"]),
    ]
    out = [{"name": n, "stops": s, "pieces": p} for n, s, p in fixed]
    rng = random.Random(25)
    for i in range(40):  # small alphabets: periodic texts and stop strings, where matching is hard
        alpha = rng.choice(["ab", "abc", "aé😀"])
        stops = ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 3))]
        pieces = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
        out.append({"name": f"random {i}", "stops": stops, "pieces": pieces})
    for c in out:
        c["pushes"], c["release"] = by_definition(c["stops"], c["pieces"])
    return out


def _write():
    data = {"about": __doc__.split("\n\n")[0].replace("\n", " "), "cases": _cases()}
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in data["cases"])  # one case a line
    about = json.dumps(data["about"], ensure_ascii=False)
    FIXTURE.write_text(f'{{\n "about": {about},\n "cases": [\n{lines}\n ]\n}}\n', encoding="utf-8")


if __name__ == "__main__" and "--write" in sys.argv:
    _write()
CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


def test_the_table_is_the_definition():
    assert len(CASES) >= 50 and any(c["release"] is None for c in CASES) and any(c["release"] for c in CASES)
    for c in CASES:
        assert [c["pushes"], c["release"]] == list(by_definition(c["stops"], c["pieces"])), c["name"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_stop_matcher_gives_the_table(case):
    m = StopMatcher(case["stops"])
    got = [list(m.push(p)) for p in case["pieces"][: len(case["pushes"])]]
    assert got == case["pushes"]
    if case["release"] is not None:
        assert m.release() == case["release"]
