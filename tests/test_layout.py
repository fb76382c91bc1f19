"""Run-folder settings records: a resumed stage never mixes shards made with other settings; files
looked up in the manifest by split."""
import pyarrow as pa
import pytest

from core.settings import check_settings, pin_settings, SETTINGS_FILE, SettingsChanged
from core.store import join, write_table
from jobs.layout import RunDir, next_shard_number, paths_of


def test_pin_settings_records_then_checks(tmp_path):
    folder = str(tmp_path / "candidates" / "m@64")
    pin_settings(folder, {"k": 10, "normalize": {"enabled": True}}, "search")
    assert (tmp_path / "candidates" / "m@64" / SETTINGS_FILE).is_file()
    pin_settings(folder, {"normalize": {"enabled": True}, "k": 10}, "search")  # same settings, any order
    with pytest.raises(SettingsChanged, match=r"search shards .*\(normalize.enabled: True -> False\)"):
        pin_settings(folder, {"k": 10, "normalize": {"enabled": False}}, "search")
    with pytest.raises(SettingsChanged, match=r"beta: None -> 0.5.*delete"):
        pin_settings(folder, {"k": 10, "normalize": {"enabled": True}, "beta": 0.5}, "search")


def test_check_settings_never_writes(tmp_path):
    folder = str(tmp_path / "features" / "m@64")
    assert check_settings(folder, {"scale": 64}, "extract") is False and not (tmp_path / "features").exists()
    pin_settings(folder, {"scale": 64}, "extract")
    assert check_settings(folder, {"scale": 64}, "extract") is True
    with pytest.raises(SettingsChanged, match="scale: 64 -> 80"):
        check_settings(folder, {"scale": 80}, "extract")


def test_a_resumed_stage_numbers_new_shards_past_a_gap():
    """part-00001 failed, part-00002 finished: new shards start at 3, never overwriting 2."""
    assert next_shard_number([]) == 0
    assert next_shard_number(["/r/verify.parquet/rootsift/part-00000.parquet",
                              "/r/verify.parquet/rootsift/part-00002.parquet"]) == 3
    assert next_shard_number(["/r/verify.parquet/rootsift-described/reference-00011.parquet"]) == 12


def test_paths_of_reads_the_asked_ids_of_one_split_and_names_those_missing(tmp_path):
    """A query and a reference may share an id: each lookup goes through its split."""
    run = RunDir(str(tmp_path))
    for name, ids in (("query-00000", "ab"), ("query-00001", "c"), ("reference-00000", "ad")):
        split = name.split("-")[0]
        table = pa.table({"image_id": list(ids), "path": [f"{split[0]}/{i}" for i in ids], "split": [split] * len(ids)})
        write_table(table, join(run.manifest, f"{name}.parquet"))
    assert paths_of(run, "query", ["c", "a", "a"]) == {"a": "q/a", "c": "q/c"}
    assert paths_of(run, "reference", {"a"}) == {"a": "r/a"}
    assert paths_of(run, "train", []) == {}
    with pytest.raises(ValueError, match=r"manifest.parquet: no reference image with id\(s\) \['b', 'c'\]"):
        paths_of(run, "reference", ["a", "b", "c"])
