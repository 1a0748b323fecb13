import pytest

from patronus.evaluation.harness import EvalConfig, evaluate


@pytest.mark.slow
def test_full_glyph_suite_on_the_shipped_model_is_reproducible(tmp_path):
    """The numbers docs/results/baseline.md quotes: the same settings give the same metrics twice."""
    first = evaluate("patronus-tiny", tmp_path / "a", EvalConfig(suite="glyph"))
    second = evaluate("patronus-tiny", tmp_path / "b", EvalConfig(suite="glyph"))
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["unsafe_rate"]["n"] == 216
    assert first["model"]["weights_sha256"] == second["model"]["weights_sha256"]
