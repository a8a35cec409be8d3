"""bench/json_mask.py on the tiny tokenizer: llguidance measured end to end (the document walked
token by token, every token allowed), a library that does not import is skipped and said so, and
the byte spelling given to outlines-core reproduces the tokenizer's own text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import json_mask


def test_llguidance_on_tiny_tokenizer_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mask.json"
    assert json_mask.main(["tiny-gemma3", "--libraries", "llguidance", "--walks", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["vocab"] == 489 and report["document_tokens"] > 20
    assert report["apply_median_ms"] > 0
    result = report["libraries"]["llguidance"]
    assert result["prepare_s"] > 0
    assert set(result["grammars"]) == {"json_object", "json_schema"}
    for row in result["grammars"].values():
        # The valid document is allowed at every token and complete at the end.
        assert row["refused_tokens"] == 0 and row["complete"] is True
        assert row["samples"] == 2 * report["document_tokens"]
        assert row["compile_ms"] > 0 and 0 < row["mask_median_ms"] <= row["mask_p95_ms"] <= row["mask_max_ms"]
    printed = capsys.readouterr().out
    assert "| llguidance " in printed and "json_schema" in printed


def test_missing_library_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    out = tmp_path / "mask.json"
    assert (
        json_mask.main(["tiny-gemma3", "--libraries", "xgrammar,llguidance", "--walks", "1", "--json", str(out)]) == 0
    )
    libraries = json.loads(out.read_text())["libraries"]
    assert libraries["xgrammar"]["skipped"].startswith("not installed")
    assert libraries["llguidance"]["grammars"]["json_object"]["refused_tokens"] == 0
    assert "xgrammar: skipped, not installed" in capsys.readouterr().out


def test_unknown_library_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        json_mask.main(["tiny-gemma3", "--libraries", "guidance"])
    assert exc.value.code == 2


def test_token_bytes_spell_the_tokenizer_text(tiny_loaded) -> None:
    tokenizer = tiny_loaded.tokenizer
    spelled = {token_id: spelling for spelling, ids in json_mask.token_bytes(tokenizer).items() for token_id in ids}
    text = 'Zoë said: {"naïve": [1, 2.5e3, "café"]}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(spelled[token_id] for token_id in ids) == text.encode()
    assert not set(tokenizer.all_special_ids) & set(spelled)
