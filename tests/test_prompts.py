"""inference/prompts.py: shipped templates, site overrides, most-specific match, validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from config.settings import ModelSettings
from inference.prompts import (
    SHIPPED_PROMPTS_DIR,
    PromptLibrary,
    PromptTemplateError,
    load_template,
    load_templates,
)


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_templates_load_with_both_languages() -> None:
    templates = {t.name: t for t in load_templates(SHIPPED_PROMPTS_DIR)}
    assert {"chest_xray", "ct", "mr", "default"} <= templates.keys()
    for template in templates.values():
        assert set(template.texts) == {"en", "zh"}, template.source
        assert "JSON" in template.texts["en"] and "JSON" in template.texts["zh"]
    assert re.search(r"[\u4e00-\u9fff]", templates["chest_xray"].texts["zh"])


def test_chest_template_asks_for_the_report_json_with_medgemma_boxes() -> None:
    prompt = PromptLibrary().select("CR", "CHEST", "ANY_AE", "en")
    assert prompt.template_name == "chest_xray"
    example = next(line for line in prompt.text.splitlines() if line.startswith('{"findings"'))
    # The one-line example is the schema: valid JSON once the box placeholders are numbers.
    schema = json.loads(example.replace("[y0, x0, y1, x1]", "[0, 0, 0, 0]"))
    assert set(schema) == {"findings", "impression", "recommendation", "urgency"}
    assert set(schema["findings"][0]) >= {
        "label",
        "location",
        "size_mm",
        "density",
        "boundary",
        "box_2d",
    }
    assert "0 to 1000" in prompt.text and "routine" in prompt.text and "critical" in prompt.text


@pytest.mark.parametrize(
    ("modality", "body_part", "expected"),
    [
        ("CR", "CHEST", "chest_xray"),
        ("DX", "chest", "chest_xray"),
        ("DX", "HAND", "default"),
        ("CT", "HEAD", "ct"),
        ("MR", "", "mr"),
        ("US", "ABDOMEN", "default"),
    ],
)
def test_shipped_selection(modality: str, body_part: str, expected: str) -> None:
    assert PromptLibrary().select(modality, body_part, "MODALITY1").template_name == expected


def test_language_selects_the_text() -> None:
    library = PromptLibrary.from_settings(ModelSettings(language="zh"))
    english = library.select("CR", "CHEST", language="en")
    chinese = library.select("CR", "CHEST", language="zh")
    assert chinese.language == "zh" and english.language == "en"
    assert chinese.text != english.text
    assert library.question("CR", "CHEST", language="zh") == chinese.text


def test_site_templates_override_and_the_most_specific_wins(tmp_path: Path) -> None:
    site = tmp_path / "prompts"
    write(
        site,
        "er_chest.toml",
        ('en = "ER chest question"\n[match]\ncalling_ae = "ER_CR01"\nbody_part = "CHEST"\n'),
    )
    write(site, "er_any.toml", 'en = "ER any question"\n[match]\ncalling_ae = ["ER_CR01"]\n')
    write(
        site,
        "chest_xray.toml",
        'en = "site chest"\nzh = "本院胸片"\n'
        '[match]\nmodality = ["CR", "DX"]\nbody_part = ["CHEST"]\n',
    )
    library = PromptLibrary.load(site)

    assert library.select("CR", "CHEST", "ER_CR01").text == "ER chest question"
    assert library.select("CR", "HAND", "ER_CR01").text == "ER any question"
    # A site file with a shipped name replaces the shipped template.
    replaced = library.select("DX", "CHEST", "WARD_DX", "zh")
    assert (replaced.text, replaced.source.parent) == ("本院胸片", site)
    assert library.select("CT", "HEAD", "WARD").template_name == "ct"  # shipped still there


def test_missing_language_falls_back_to_the_other(tmp_path: Path) -> None:
    site = write(tmp_path, "only_en.toml", 'en = "English only"\n[match]\nmodality = "XA"\n')
    prompt = PromptLibrary.load(site.parent).select("XA", language="zh")
    assert (prompt.text, prompt.language) == ("English only", "en")


def test_equal_rank_prefers_the_site_template(tmp_path: Path) -> None:
    write(tmp_path, "ct_site.toml", 'en = "site CT"\n[match]\nmodality = "CT"\n')
    assert PromptLibrary.load(tmp_path).select("CT").text == "site CT"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('en = "x"\n[match\n', "not valid TOML"),
        ('en = "x"\nlanguage = "fr"\n', "language: Extra inputs are not permitted"),
        ('en = "x"\n[match]\nstation = "A"\n', "match.station"),
        ('description = "no text"\n', "needs a question"),
        ('en = "   "\n', "en: Value error, the question text is empty"),
        ('en = "x"\n[match]\nmodality = 3\n', "match.modality"),
        ('en = "x"\n[match]\nbody_part = [""]\n', "must not be blank"),
        ('en = "x"\nquestion_first = "yes"\n', "question_first: Input should be a valid boolean"),
        ('en = "x"\nquestion_first = 1\n', "question_first: Input should be a valid boolean"),
    ],
)
def test_invalid_template_files_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path, "broken.toml", content)
    with pytest.raises(PromptTemplateError) as caught:
        load_template(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_a_broken_site_file_stops_the_library_with_its_name(tmp_path: Path) -> None:
    write(tmp_path, "good.toml", 'en = "fine"\n')
    bad = write(tmp_path, "bad.toml", "en = \n")
    with pytest.raises(PromptTemplateError, match=re.escape(str(bad))):
        PromptLibrary.load(tmp_path)


def test_missing_site_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PromptTemplateError, match="not found"):
        PromptLibrary.load(tmp_path / "absent")


def test_no_match_without_a_default(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    write(shipped, "ct.toml", 'en = "ct"\n[match]\nmodality = "CT"\n')
    library = PromptLibrary(shipped_dir=shipped)
    with pytest.raises(PromptTemplateError, match="no prompt template matches"):
        library.select("CR", "CHEST")


def test_question_first_defaults_to_images_first_in_every_shipped_template() -> None:
    assert not any(t.question_first for t in load_templates(SHIPPED_PROMPTS_DIR))
    assert PromptLibrary().select("CR", "CHEST").question_first is False


def test_question_first_flows_from_the_template_to_the_prompt(tmp_path: Path) -> None:
    write(
        tmp_path, "chest_first.toml", 'en = "q"\nquestion_first = true\n[match]\nmodality = "CR"\n'
    )
    write(tmp_path, "ct_site.toml", 'en = "ct"\nquestion_first = false\n[match]\nmodality = "CT"\n')
    library = PromptLibrary.load(tmp_path)

    assert library.select("CR").question_first is True
    assert library.select("CT").question_first is False
    assert library.select("MR").question_first is False  # the shipped mr template
