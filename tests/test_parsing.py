"""inference/parsing.py: a corpus of realistic model outputs plus the rules one by one."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.parsing import (
    json_spans,
    parse_model_output,
    parse_report,
    strip_thinking,
    validate_box,
)
from storage.report_schema import (
    MAX_PHRASE_CHARS,
    MAX_TEXT_CHARS,
    Finding,
    ParseStatus,
    ReportContent,
    Urgency,
    clean_model_phrase,
    clean_model_text,
)

CORPUS = Path(__file__).parent / "data" / "model_outputs"
CASES = sorted(CORPUS.glob("*.txt"))


def test_corpus_is_big_enough_and_covers_both_languages() -> None:
    assert len(CASES) >= 20
    assert any(p.name.startswith("zh_") for p in CASES)
    assert all(p.with_name(p.stem + ".expected.json").is_file() for p in CASES)


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_corpus_output_parses_as_expected(case: Path) -> None:
    expected = json.loads(case.with_name(case.stem + ".expected.json").read_text("utf-8"))
    content = ReportContent.model_validate(expected["content"])
    parsed = parse_report(
        case.read_text(encoding="utf-8"),
        language=content.language,
        image_count=expected["image_count"],
    )
    assert parsed.content == content
    assert parsed.notes == expected["notes"]


# --------------------------------------------------------------------------- rules


def test_empty_and_none_are_empty() -> None:
    for text in (None, "", "  \n", "<end_of_turn>"):
        assert parse_model_output(text).parse_status == ParseStatus.EMPTY


def test_thinking_is_dropped_up_to_the_last_marker() -> None:
    text = '<unused94>thought\n{"findings": [{"label": "draft"}]}<unused95>{"impression": "final"}'
    content = parse_model_output(text)
    assert content.parse_status == ParseStatus.OK
    assert content.impression == "final" and content.findings == []
    assert strip_thinking("a<unused95>b<unused95>c") == ("c", False)
    assert strip_thinking("<unused94>thought\nhalf way") == ("\nhalf way", True)


def test_unclosed_thinking_is_never_mined_for_json() -> None:
    text = '<unused94>thought\n{"findings": [{"label": "nodule", "box_2d": [1, 2, 3, 4]}]}'
    content = parse_model_output(text)
    assert content.parse_status == ParseStatus.NARRATIVE_ONLY
    assert content.findings == []


def test_truncated_json_is_not_repaired_nor_mined() -> None:
    full = (
        '{"findings": [{"label": "nodule", "box_2d": [100, 100, 200, 200]}, '
        '{"label": "effusion", "box_2d": [600, 600, 800, 900]}], "impression": "two findings"}'
    )
    for cut in range(1, len(full)):
        content = parse_model_output(full[:cut])
        assert content.parse_status in (ParseStatus.NARRATIVE_ONLY, ParseStatus.EMPTY)
        assert content.findings == [], cut
    assert len(parse_model_output(full).findings) == 2


def test_invalid_json_spans_are_skipped_whole() -> None:
    spans, truncated = json_spans('x {"a": [1, 2,]} y [1] z {"b": {"c": 1}}')
    assert not truncated
    assert [s.value for s in spans] == [[1], {"b": {"c": 1}}]


@pytest.mark.parametrize(
    ("box", "valid"),
    [
        ([0, 0, 1000, 1000], True),
        ([10.5, 20, 10.5, 30], True),
        ([100, 200, 50, 300], False),  # y0 > y1
        ([100, 200, 150, 100], False),  # x0 > x1
        ([-1, 0, 10, 10], False),
        ([0, 0, 10, 1001], False),
        ([0, 0, 10], False),
        ([0, 0, 10, 10, 10], False),
        (["1", "2", "3", "4"], False),
        ([True, 0, 1, 1], False),
        ([float("nan"), 0, 1, 1], False),
        ("0,0,10,10", False),
        (None, False),
    ],
)
def test_box_validation(box: object, valid: bool) -> None:
    assert (validate_box(box) is not None) is valid


def test_invalid_box_keeps_the_finding_without_box() -> None:
    parsed = parse_report('{"findings": [{"label": "nodule", "box_2d": [500, 500, 400, 600]}]}')
    (finding,) = parsed.content.findings
    assert finding.label == "nodule" and finding.box_2d is None
    assert any("box_2d" in note for note in parsed.notes)


@pytest.mark.parametrize(
    ("word", "urgency"),
    [
        ("routine", Urgency.ROUTINE),
        ("Urgent", Urgency.URGENT),
        (" CRITICAL", Urgency.CRITICAL),
        ("危急", Urgency.CRITICAL),
        ("stat", None),
        ("", None),
        (3, None),
    ],
)
def test_urgency_words(word: object, urgency: Urgency | None) -> None:
    text = json.dumps({"findings": [], "impression": "x", "urgency": word})
    assert parse_model_output(text).urgency == urgency


def test_localization_list_is_a_findings_list() -> None:
    text = 'Sure:\n```json\n[{"box_2d": [10, 20, 30, 40], "label": "nodule"}]\n```'
    content = parse_model_output(text)
    assert content.parse_status == ParseStatus.OK
    assert [(f.label, f.box_2d) for f in content.findings] == [("nodule", [10, 20, 30, 40])]
    assert content.narrative == "Sure:"


def test_final_answer_json_is_preferred_over_earlier_json() -> None:
    text = 'Draft: {"impression": "draft"}\nFinal Answer: {"impression": "final"}'
    assert parse_model_output(text).impression == "final"


def test_language_is_recorded() -> None:
    assert parse_model_output("肺纹理增多。", language="zh").language == "zh"


FRAGMENTS = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        '"',
        " ",
        "\n",
        "```json\n",
        "```",
        "Final Answer:",
        "<unused95>",
        "<unused94>thought",
        '"label"',
        '"box_2d"',
        '"findings"',
        '"urgency"',
        '"nodule"',
        '"effusion"',
        "[1, 2, 3, 4]",
        "[100, 200, 300, 400]",
        "null",
        "12",
        '{"label": "mass", "box_2d": [1, 1, 2, 2]}',
        '"impression": "ok"',
        "prose words",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=40).map("".join))
def test_never_crashes_and_never_invents(text: str) -> None:
    content = parse_model_output(text, image_count=1)
    assert isinstance(content, ReportContent)
    answer, _ = strip_thinking(text)
    for finding in content.findings:
        assert f'"{finding.label}"' in answer  # every label is quoted in the answer itself
        if finding.box_2d is not None:
            assert validate_box(finding.box_2d) is not None
    if content.parse_status == ParseStatus.NARRATIVE_ONLY:
        assert content.narrative and not content.findings


# --------------------------------------------------------------------------- text cleaning


def test_model_text_is_cleaned_where_it_becomes_report_content() -> None:
    text = json.dumps(
        {
            "findings": [
                {"label": "nod\ufffdule\x00", "location": "right\r\nupper  lobe\u200b"},
                {"label": "\ufffd\ufffd\x07", "box_2d": [1, 2, 3, 4]},
                "\ufffd",
            ],
            "impression": "Nodule.\x1b\r\nNo effusion.\t\x7f",
            "recommendation": "CT in 3 months.\u2028Compare.",
        }
    )
    parsed = parse_report(text + "\nDone.\ufffd\x0c")
    content = parsed.content
    assert [(f.label, f.location) for f in content.findings] == [("nodule", "right upper lobe")]
    assert "finding 1: no label: dropped" in parsed.notes
    assert content.impression == "Nodule.\nNo effusion."
    assert content.recommendation == "CT in 3 months.\nCompare."
    assert content.narrative == "Done."
    dumped = content.model_dump_json()
    assert "\\ufffd" not in dumped and "\\u0000" not in dumped and "\\u001b" not in dumped


def test_an_answer_of_unusable_characters_is_empty() -> None:
    assert parse_model_output("\ufffd\x00\x07 \u200b").parse_status == ParseStatus.EMPTY


def test_report_content_from_anywhere_is_cleaned() -> None:
    """Loaded from the database or built by hand, the same rules apply."""
    content = ReportContent.model_validate(
        {
            "parse_status": "ok",
            "findings": [{"label": "mass\x00\n  left", "density": "\ufffd"}],
            "narrative": "a\r\nb\rc\x0bd  \n\n",
        }
    )
    assert content.findings[0].label == "mass left"
    assert content.findings[0].density is None
    assert content.narrative == "a\nb\nc\nd"


def test_texts_are_bounded() -> None:
    content = ReportContent(
        parse_status=ParseStatus.OK,
        findings=[Finding(label="x" * 5000)],
        narrative="y" * 50_000,
    )
    assert len(content.findings[0].label) == MAX_PHRASE_CHARS
    assert len(content.narrative) == MAX_TEXT_CHARS


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_clean_text_has_only_line_feeds_and_printable_characters(text: str) -> None:
    cleaned = clean_model_text(text)
    assert "\ufffd" not in cleaned and "\r" not in cleaned
    assert all(c == "\n" or unicodedata.category(c)[0] != "C" for c in cleaned)
    assert len(cleaned.splitlines() or [""]) == cleaned.count("\n") + 1
    assert clean_model_text(cleaned) == cleaned
    phrase = clean_model_phrase(text)
    assert "\n" not in phrase and clean_model_phrase(phrase) == phrase
