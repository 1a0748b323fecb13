import dataclasses
from pathlib import Path

import pytest

from patronus.config import build
from patronus.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    pairs: tuple[tuple[str, float], ...] = (("a", 1.0),)


@dataclasses.dataclass(frozen=True)
class Outer:
    steps: int = 1
    lr: float = 1e-3
    flag: bool = False
    path: str | None = None
    span: tuple[int, int] = (1, 2)
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.mark.parametrize("values,message", [
    ({"steps": "many"}, "x.steps must be an integer, got 'many'"),
    ({"steps": 2.5}, "x.steps must be an integer, got 2.5"),
    ({"steps": True}, "x.steps must be an integer, got True"),
    ({"lr": "fast"}, "x.lr must be a finite number, got 'fast'"),
    ({"flag": 1}, "x.flag must be true or false, got 1"),
    ({"path": 3}, "x.path must be a string or none, got 3"),
    ({"span": [1]}, "x.span must be a list [an integer, an integer], got [1]"),
    ({"inner": {"pairs": [["a", "b"]]}}, "x.inner.pairs must be a list, each a list [a string, a finite number]"),
])
def test_values_of_the_wrong_type_are_refused_with_the_field_and_the_type(values, message):
    with pytest.raises(ConfigError) as e:
        build(Outer, values, "x")
    assert str(e.value).startswith(message)


def test_right_types_build_with_ints_as_floats_and_lists_as_tuples():
    cfg = build(Outer, {"steps": 3, "lr": 1, "path": None, "span": [2, 4], "inner": {"pairs": [["b", 2]]}}, "x")
    assert cfg == Outer(steps=3, lr=1.0, span=(2, 4), inner=Inner(pairs=(("b", 2.0),)))
    assert isinstance(cfg.lr, float)


ROOT = Path(__file__).parent.parent
# Reproduction recipes and research experiments.
CONFIGS = [p for d in ("reproduce", "research/configs") for p in (ROOT / d).rglob("*.toml")]


@pytest.mark.parametrize("path", sorted(CONFIGS), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_config_files_load(path):
    from patronus.defenses import load_defense
    from patronus.defenses.patronus.config import load_config
    from patronus.models.train_base import load_train_config
    from patronus.sweep.field import load_sweep_grid

    if path.name.startswith("grid-"):  # a robustness grid or a field grid
        load_sweep_grid(str(path))
    elif path.name.startswith("train-"):  # a base-model recipe
        load_train_config(path)
    elif path.name.startswith("uce-"):  # a baseline's settings
        load_defense("uce").load_config(path=path)
    else:
        for preset in ("quick", "full"):
            load_config(preset, path)


def test_a_setting_added_since_a_run_started_is_unchanged_at_its_default():
    from patronus.config import settings_changed

    defaults = {"lr": 1.0, "new": False, "bank": {"n": 4, "cache_dir": None}}
    added = ("new", "bank.cache_dir")
    saved = {"lr": 1.0, "bank": {"n": 4}}  # written before `new` and `bank.cache_dir` existed
    same = {"lr": 1.0, "new": False, "bank": {"n": 4, "cache_dir": None}}
    assert not settings_changed(saved, same, defaults, added)
    assert settings_changed(saved, same | {"new": True}, defaults, added)
    assert settings_changed(saved, same | {"lr": 2.0}, defaults, added)
    assert settings_changed(saved, same | {"bank": {"n": 4, "cache_dir": "/c"}}, defaults, added)
    # Only the settings named as added: an empty or truncated config.json is a different run.
    assert settings_changed({}, same, defaults, added)
    assert settings_changed(saved, same, defaults)


def test_the_default_grid_parts_together_are_the_default_grids_protected_cells():
    from patronus.sweep.grid import load_grid

    default = load_grid("default")
    parts = [load_grid(ROOT / "reproduce" / f"grid-default-part{i}.toml") for i in (1, 2, 3)]
    cells = [frozenset(c.items()) for p in parts for c in p.cells()]
    assert len(cells) == len(set(cells)) and set(cells) == {frozenset(c.items()) for c in default.cells()}
    for p in parts:
        assert p.budgets == default.budgets and (p.batch_size, p.data, p.suite) == (default.batch_size, default.data,
                                                                                     default.suite)
        assert p.references == ("original-vae",)  # unprotected and scratch do not depend on the protected model
