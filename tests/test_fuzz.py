"""Property-based fuzzing of the files users write: protect configs, grid files, prompt files.

Whatever the bytes or values, loading either succeeds or raises the package's own error (one
line at the CLI, exit 2), never another exception that would surface as a traceback.
"""

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from patronus.config import to_dict
from patronus.defenses.patronus.config import ProtectConfig, UNetAlignConfig, load_config
from patronus.errors import PatronusError
from patronus.evaluation.suites import load_prompt_file
from patronus.sweep.grid import GridConfig, load_grid


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a loaded config: no setting means either."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=8), st.none())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                           inner, max_size=3),
                      max_leaves=6)


def _settings(fields: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(fields), st.one_of(scalars, values), max_size=4)


PROTECT_KEYS = [k for k in to_dict(ProtectConfig()) if k != "unet"]
UNET_KEYS = list(to_dict(UNetAlignConfig()))
GRID_KEYS = list(GridConfig.__dataclass_fields__)


@FUZZ
@given(top=_settings(PROTECT_KEYS), unet=_settings(UNET_KEYS))
def test_protect_config_values(tmp_path, top, unet):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(top | ({"unet": unet} if unet else {})))
    try:
        cfg = load_config("quick", path)
    except PatronusError:
        return
    assert _finite(to_dict(cfg))


FLOAT_KEYS = [k for k, v in to_dict(ProtectConfig()).items() if isinstance(v, float)]
UNET_FLOAT_KEYS = [k for k, v in to_dict(UNetAlignConfig()).items() if isinstance(v, float)]


@FUZZ
@given(key=st.sampled_from(FLOAT_KEYS + [f"unet.{k}" for k in UNET_FLOAT_KEYS]), value=st.floats())
def test_one_float_setting(tmp_path, key, value):
    """Each number alone: accepted only where it is a usable value (finite, in range)."""
    path = tmp_path / "c.json"
    table, _, name = key.rpartition(".")
    path.write_text(json.dumps({table: {name: value}} if table else {name: value}))
    try:
        cfg = load_config("quick", path)
    except PatronusError:
        return
    assert _finite(to_dict(cfg))


@FUZZ
@given(raw=st.binary(max_size=64), suffix=st.sampled_from([".toml", ".yaml", ".json"]))
def test_protect_config_bytes(tmp_path, raw, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(raw)
    try:
        load_config("quick", path)
    except PatronusError:
        pass


@FUZZ
@given(grid=_settings(GRID_KEYS))
def test_grid_values(tmp_path, grid):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(grid))
    try:
        loaded = load_grid(path)
    except PatronusError:
        return
    assert _finite(to_dict(loaded))


@FUZZ
@given(raw=st.binary(max_size=96), suffix=st.sampled_from([".txt", ".csv"]))
@example(raw=b"\r\x00", suffix=".csv")  # found by this test: csv.Error escaped (a carriage return, a NUL)
@example(raw=b"prompt,sd_seed\nx,inf\n", suffix=".csv")
@example(raw=b"prompt,sd_guidance_scale\nx,nan\n", suffix=".csv")
def test_prompt_file_bytes(tmp_path, raw, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(raw)
    try:
        load_prompt_file(path, "unsafe")
    except PatronusError:
        pass


@FUZZ
@given(lr=st.floats(), guidance=st.floats())
def test_numbers_from_flags_and_grids(tmp_path, lr, guidance):
    """--lr, grid lrs and --guidance: NaN, infinity and out-of-range values are refused."""
    from patronus.attacks.config import AttackConfig
    from patronus.evaluation.harness import EvalConfig

    for make in (lambda: AttackConfig(kind="unet-full", lr=lr), lambda: GridConfig(lrs=(lr,), kinds=("unet-full",))):
        try:
            make()
        except PatronusError:
            continue
        assert math.isfinite(lr) and lr > 0
    try:
        EvalConfig(suite="glyph-quick", guidance=guidance)
    except PatronusError:
        return
    assert math.isfinite(guidance) and guidance >= 0
