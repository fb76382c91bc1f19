"""Search stage: which (query patch, reference patch) pairs ``search.pairs`` scores."""
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.settings import pin_settings
from core.store import features_table, read_table, write_table
from jobs.config import PipelineConfig
from jobs.inputs import INPUTS_SCHEMA
from jobs.layout import RunDir, shard_names
from jobs.stages.search import run_search

KEY = "m@64"


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_run(run: RunDir, feats: dict[str, pa.Table]) -> None:
    """A complete run folder around the given feature rows of each split: pinned inputs, manifest
    and patch shards, and the features as the extract stage names them (one shard, one chunk)."""
    inputs = []
    for split, table in feats.items():
        ids = list(dict.fromkeys(table.column("image_id").to_pylist()))
        inputs += [{"split": split, "image_id": i, "path": f"/img/{i}.jpg", "size": 1, "mtime_ns": 0} for i in ids]
        write_table(pa.table({"image_id": ids}), f"{run.manifest}/{split}-00000.parquet")
        write_table(table.select(["image_id", "patch_id"]), f"{run.patches}/{split}-00000.parquet")
        write_table(table, f"{run.features(KEY)}/{split}-00000-0000.parquet")
    write_table(pa.Table.from_pylist(inputs, schema=INPUTS_SCHEMA), run.inputs)
    pin_settings(run.manifest, {"limit": None, "shard_size": 1000}, "manifest")
    pin_settings(run.features(KEY), {"chunk_patches": 256}, "extract")


@pytest.fixture
def run_with_tiles(tmp_path):
    """Q0's whole image equals R0's tile; Q0's crop equals R1's tile (a patch-to-patch match)."""
    e = np.eye(8, dtype=np.float32)
    noise = unit(e[5] + e[6] + e[7])
    run = RunDir(str(tmp_path / "run"))
    refs = np.stack([unit(e[2] + 0.5 * noise), e[0], unit(e[3] + 0.5 * noise), e[1]])
    write_run(run, {"query": features_table(["Q0", "Q0"], [0, 1], "m", 64, np.stack([e[0], e[1]])),
                    "reference": features_table(["R0", "R0", "R1", "R1"], [0, 1, 0, 1], "m", 64, refs)})
    return run


def config(run: RunDir, pairs: str, normalize: dict | None = None, model: str = "m") -> PipelineConfig:
    return PipelineConfig.model_validate({
        "output": run.root, "models": [{"name": model, "scales": [64]}],
        "patches": {"reference": {"grids": [2]}},
        "search": {"k": 4, "pairs": pairs, "normalize": normalize or {"enabled": False}, "cpus_per_shard": 0.25}})


def pairs_of(run: RunDir) -> set[tuple[int, str, int]]:
    c = read_table(run.candidates(KEY))
    return set(zip(c.column("query_patch").to_pylist(), c.column("reference_id").to_pylist(),
                   c.column("reference_patch").to_pylist()))


def test_all_pairs_include_patch_to_patch(ray_local, run_with_tiles):
    run_search(config(run_with_tiles, "all"), run_with_tiles)
    assert (1, "R1", 1) in pairs_of(run_with_tiles)


def test_d2lv_pairs_keep_one_whole_side(ray_local, run_with_tiles):
    run_search(config(run_with_tiles, "d2lv"), run_with_tiles)
    got = pairs_of(run_with_tiles)
    assert (0, "R0", 1) in got                       # whole query x reference tile
    assert {rp for qp, _, rp in got if qp == 1} == {0}  # query crop x whole references only
    c = read_table(run_with_tiles.candidates(KEY))
    assert pc.all(pc.is_finite(c.column("score"))).as_py() and c.num_rows == 4 + 2


def test_the_splits_shard_actors_load_at_once(ray_local, run_with_tiles, monkeypatch):
    """Every index the stage needs (here the reference patches and the whole references) is asked for
    before it waits on any: at scale each takes minutes to load, and they overlap."""
    import jobs.stages.search as search
    events = []

    class Recorded(search.ShardedIndex):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            events.append("start")

        def info(self) -> list[dict]:
            events.append("wait")
            return super().info()

    monkeypatch.setattr(search, "ShardedIndex", Recorded)
    run_search(config(run_with_tiles, "d2lv"), run_with_tiles)
    assert events.count("start") == 2 and events.index("wait") == 2, events


def test_more_neighbours_than_train_descriptors_is_refused_before_extraction(tmp_path):
    """Two train patches cannot give three normalisation neighbours, a 2-d PCA or three stretching
    neighbours: extract refuses from the patch shards before it embeds anything, search from the features."""
    from jobs.stages.extract import run_extract

    e = np.eye(8, dtype=np.float32)
    run = RunDir(str(tmp_path / "run"))
    write_run(run, {"train": features_table(["T0", "T1"], [0, 0], "m", 64, e[:2]),
                    "query": features_table(["Q0"], [0], "m", 64, e[2:3]),
                    "reference": features_table(["R0"], [0], "m", 64, e[3:4])})
    normalize = {"enabled": True, "neighbours": 3}
    with pytest.raises(ValueError, match=r"search m@64: search.normalize.neighbours=3 exceeds the 2 train"):
        run_search(config(run, "all", normalize), run)
    with pytest.raises(ValueError, match=r"extract: search.normalize.neighbours=3 exceeds the 2 train"):
        run_extract(config(run, "all", normalize, model="tiny_cnn"), run)
    for reduce, words in (({"dim": 2}, "reduce.dim=2 needs more than 2 train descriptors"),
                          ({"stretch": True, "stretch_neighbours": 3}, "reduce.stretch_neighbours=3 exceeds the 2")):
        cfg = PipelineConfig.model_validate({**config(run, "all", model="tiny_cnn").model_dump(), "reduce": reduce})
        with pytest.raises(ValueError, match=rf"extract: {re.escape(words)}"):
            run_extract(cfg, run)
    assert not shard_names(run.features("tiny_cnn@64"))
