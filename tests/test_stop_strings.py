"""Stop strings over streamed text: whatever the pieces, the text shown is exactly the text up to
the first stop string, and nothing of a stop string is ever shown."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dymoe.runtime.stop_strings import StopStrings


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    s = StopStrings(stops)
    shown = [s.push(p) for p in pieces]
    return shown + [s.flush()], s.stopped


def expected(pieces: list[str], stops: list[str]) -> str:
    """Generation ends with the first piece (token) after which some stop string has been
    produced: the text up to the earliest stop found by then (a longer stop that began earlier but
    would complete in a later piece never gets the chance)."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[: min(hits)]
    return text


def test_a_stop_string_split_across_pieces_is_never_shown():
    shown, stopped = run(["Hello\n", "Us", "er: more"], ["User:"])
    assert stopped and "".join(shown) == "Hello\n"
    assert shown[1] == ""  # "Us" could have been the start of "User:": held back


def test_held_text_that_turns_out_harmless_is_released():
    shown, stopped = run(["ab", "c", "d"], ["cX"])
    assert not stopped and "".join(shown) == "abcd" and shown[1] == ""


def test_the_earliest_of_several_stops_wins():
    assert run(["one two three"], ["three", "two"]) == (["one ", ""], True)


def test_the_first_stop_to_complete_ends_the_text():
    # "a" completes first; "\nab", which began earlier, would only have completed a token later
    shown, stopped = run(["b\na", "bcaa"], ["\nab", "\na\n", "a"])
    assert stopped and "".join(shown) == "b\n"


@given(st.text(alphabet="abc\n", max_size=40), st.lists(st.integers(1, 5), max_size=20),
       st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3))
def test_any_split_gives_the_text_up_to_the_first_stop(text, cuts, stops):
    pieces, i = [], 0
    for n in cuts:
        pieces.append(text[i:i + n])
        i += n
    pieces.append(text[i:])
    shown, stopped = run(pieces, stops)
    assert "".join(shown) == expected(pieces, stops)
    assert stopped == any(s in text for s in stops)
