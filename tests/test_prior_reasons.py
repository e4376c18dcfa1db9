"""Why a report has no prior, in the report's language (storage/report_schema.py
PRIOR_REASONS): a Chinese report says it in Chinese, technical details (a PACS's error text)
stay as logged, and a reason stored before the catalogue existed is shown as it was."""

from __future__ import annotations

import pytest

from storage.report_schema import PRIOR_REASONS, PriorComparison

VALUES = {
    "seconds": "20",
    "detail": "C-FIND failed with status 0xA700",
    "error": "OSError",
    "what": "CR CHEST",
    "days": "730",
    "date": "20250101",
    "mode": "MOVE",
}


def has_chinese(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


@pytest.mark.parametrize("code", sorted(PRIOR_REASONS))
def test_every_reason_reads_in_english_and_in_chinese(code: str) -> None:
    comparison = PriorComparison.without(code, **VALUES)
    assert comparison.reason == comparison.reason_in("en") and "{" not in comparison.reason
    assert comparison.statement("en") == f"No prior study compared: {comparison.reason}"
    chinese = comparison.reason_in("zh")
    assert has_chinese(chinese) and "{" not in chinese and chinese != comparison.reason
    assert comparison.statement("zh") == f"未与既往检查对比：{chinese}"
    stored = PriorComparison.model_validate_json(comparison.model_dump_json())
    assert stored.statement("zh") == comparison.statement("zh")  # kept through the database


def test_values_reach_both_languages() -> None:
    comparison = PriorComparison.without("none_found", what="CR CHEST", days=730)
    assert comparison.reason == "no earlier CR CHEST study of this patient within 730 days"
    assert comparison.reason_in("zh") == "730 天内未找到该患者更早的 CR CHEST 检查"
    failed = PriorComparison.without("query_failed", detail=VALUES["detail"])
    assert failed.reason_in("zh") == f"既往检查查询失败：{VALUES['detail']}"


def test_a_reason_stored_before_the_catalogue_is_shown_as_it_was() -> None:
    old = PriorComparison(compared=False, reason="the study has no Patient ID")
    assert old.statement("zh") == "未与既往检查对比：the study has no Patient ID"
    unknown = PriorComparison(compared=False, reason="as stored", reason_code="gone")
    assert unknown.reason_in("zh") == "as stored"
