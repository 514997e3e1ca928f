"""A trained run loaded for use (engine/trained.py): a malformed threshold.json is named."""

import pytest
from support import _clean, _copy_run, _predict


@pytest.mark.parametrize(
    "content", ["{", '{"fissure_threshold": "high"}', "[]", '{"fissure_threshold": NaN}']
)
def test_a_malformed_threshold_json_is_named(run64, data64, tmp_path, content):
    run = _copy_run(run64, tmp_path)
    (run / "threshold.json").write_text(content)
    result = _predict(run, next((data64 / "images").glob("*.png")), out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "threshold.json: malformed" in result.output
