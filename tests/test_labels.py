"""Head labels: one grammar, read the same by every page, figure and API field."""

import pytest

from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.labels import head_label, parse_head, parse_head_label, parse_heads


@pytest.mark.parametrize("text, head", [
    ("L1H5", (1, 5)), ("1.5", (1, 5)), ("1:5", (1, 5)), ("l1h5", (1, 5)), (" L12 H0 ", (12, 0)),
    ("L1H10\u200b", (1, 10)),
])
def test_every_written_form_reads_as_the_same_head(text, head):
    assert parse_head(text) == head
    assert parse_head(head_label(*head)) == head


@pytest.mark.parametrize("text", ["H3", "L1", "1", "L1H", "LxHy", "1.5.2", "", "1" * 7 + ".1",
                                  "L-1H2"])
def test_anything_else_is_not_a_head(text):
    assert parse_head(text) is None
    assert parse_head_label(text) is None


def test_a_list_of_heads_and_a_message_naming_the_bad_item():
    assert parse_heads("L1H5, 1.0;2:3  l4h1") == [(1, 5), (1, 0), (2, 3), (4, 1)]
    assert parse_heads("  ") == []
    with pytest.raises(AnalysisError, match="'L1X5'"):
        parse_heads("L0H1 L1X5")
