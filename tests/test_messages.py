"""tlkit.messages.first_line: the one way an error's first line is taken."""

from tlkit.messages import first_line


def test_the_first_non_blank_line_stripped_and_cut():
    err = RuntimeError("\n  the store is down  \nTraceback (most recent call last):\n  ...")
    assert first_line(err) == "the store is down"
    assert first_line(err, 9) == "the store"
    assert first_line("one\ntwo") == "one"


def test_an_empty_message_gives_the_type_name_not_an_index_error():
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("  \n ")) == "OSError"
    assert first_line(KeyError(), 3) == "KeyError"  # the name is not cut: it is all there is to say
    assert first_line("") == ""
