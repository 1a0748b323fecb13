import json

import pytest
from PIL import Image

from patronus.world import export_imagefolder


def test_export_writes_imagefolder_with_metadata(tmp_path):
    out = export_imagefolder("attacker", 12, tmp_path / "attacker")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert {"file_name", "text"} <= set(row)
        assert Image.open(out / row["file_name"]).size == (32, 32)


def test_export_refuses_existing_dir_and_leaves_nothing_half_written(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        export_imagefolder("eval", 2, tmp_path / "x")
    with pytest.raises(ValueError):
        export_imagefolder("nope", 2, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["mine.txt"]
