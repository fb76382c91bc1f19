"""copydet plan: the arithmetic of patches, bytes, index memory and hours on tiny numbers."""
import json

import numpy as np
import pytest

from jobs.cli import main
from jobs.config import load_config
from jobs.plan import (
    Throughput,
    build_plan,
    format_plan,
    patches_per_image,
    reference_index_memory,
    split_counts,
)
from patchers.views import ViewConfig

SETS = ["models=[{name: tiny_cnn, scales: [64, 96], dtype: float16}]", "patches.query.preset=fast",
        "patches.reference.preset=ref_fast", "search.normalize.enabled=false", "search.shard_size=30",
        "search.exact_max=1000"]


def test_patches_per_image_counts_views_and_budgets():
    assert patches_per_image(ViewConfig(preset="fast")) == 10        # full, 3 rotations, flip, 5 crops
    assert patches_per_image(ViewConfig(preset="ref_d2lv")) == 19
    assert patches_per_image(ViewConfig(preset="d2lv")) == 109       # 9 views + 100 proposals
    assert patches_per_image(ViewConfig(preset="d2lv", max_patches=50)) == 50


def test_reference_index_memory_by_shard_kind():
    sets = ["search.shard_size=100", "search.exact_max=60", "search.pq_m=8", "search.nlist=2"]
    cfg = load_config(None, [*sets, "search.refine=none"]).search
    assert reference_index_memory(0, 16, cfg) == (0, 0, "-")
    assert reference_index_memory(50, 16, cfg) == (50 * 16 * 4, 50 * 16 * 4, "flat")
    # 250 rows -> shards of 100, 100, 50 rows, all IVF-PQ: codes + ids, 2 centroids, the PQ codebooks
    def ivfpq(n: int) -> int:  # nlist is capped at rows / 39
        return n * (8 + 8) + min(2, n // 39) * 16 * 4 + 256 * 16 * 4
    assert reference_index_memory(250, 16, cfg) == (2 * ivfpq(100) + ivfpq(50), ivfpq(100), "ivfpq")
    # the default re-ranks with SQ8 vectors: one byte per dim and row, plus the per-dim min and range
    cfg = load_config(None, [*sets, "search.refine=sq8"]).search
    def sq8(n: int) -> int:
        return ivfpq(n) + n * 16 + 2 * 16 * 4
    assert reference_index_memory(250, 16, cfg) == (2 * sq8(100) + sq8(50), sq8(100), "ivfpq")


def test_plan_arithmetic(tiny_dataset):
    cfg = load_config(None, [f"data.root={tiny_dataset}", *SETS])
    counts = split_counts(cfg)
    assert counts == {"reference": 8, "query": 6, "train": 6}
    assert split_counts(cfg, references=1000, images=3) == {"reference": 1000, "query": 3, "train": 3}
    tp = Throughput("test", {"tiny_cnn@64": 10.0, "tiny_cnn@96": 5.0}, search_pairs_per_s=4.0)
    plan = build_plan(cfg, counts, tp, gpus=2, dims={"tiny_cnn": 16})
    assert plan.patches_per_image == {"query": 10, "reference": 5, "train": 1}
    k64, k96 = plan.keys
    assert k64.feature_bytes == {"query": 60 * 16 * 2, "reference": 40 * 16 * 2, "train": 6 * 16 * 2}
    assert (k64.index_bytes, k64.shard_bytes, k64.index_kind) == (40 * 16 * 4, 30 * 16 * 4, "flat")  # 30 + 10
    assert k64.extract_hours == pytest.approx(106 / 10 / 3600)
    assert k96.extract_hours == pytest.approx(106 / 5 / 3600)
    assert k64.search_hours == pytest.approx(60 * 40 / 4 / 3600)
    text = format_plan(plan)
    assert "tiny_cnn@96" in text and "1.2 KiB" in text and "query             6" in text


def test_plan_d2lv_pairs_add_a_whole_reference_index_and_search_less(tiny_dataset):
    cfg = load_config(None, [f"data.root={tiny_dataset}", *SETS, "search.pairs=d2lv"])
    tp = Throughput("test", {"tiny_cnn@64": 10.0, "tiny_cnn@96": 5.0}, search_pairs_per_s=4.0)
    k64 = build_plan(cfg, split_counts(cfg), tp, dims={"tiny_cnn": 16}).keys[0]
    assert k64.index_bytes == (40 + 8) * 16 * 4                  # 8 references x 5 patches + 8 whole
    assert k64.search_hours == pytest.approx((6 * 40 + 54 * 8) / 4 / 3600)  # whole queries x patches + rest x whole


def test_plan_command_reads_a_bench_file(tiny_dataset, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "A100", "images_per_s": {"tiny_cnn@64": 3600, "tiny_cnn@96": 1800},
                                 "search_pairs_per_s": 1e9}))
    sets = sum((["--set", s] for s in [f"data.root={tiny_dataset}", *SETS]), [])
    assert main(["plan", *sets, "--references", "36000", "--throughput", str(bench), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "A100" in out and "180,000" in out   # 36,000 references x 5 patches
    for text in ("{}", '{"images_per_s": 3}', '{"x": 1'):
        bench.write_text(text)
        assert main(["plan", *sets, "--throughput", str(bench)]) == 2
        assert f"--throughput {bench}: not a bench JSON" in capsys.readouterr().err
    assert main(["plan", *sets, "--throughput", str(tmp_path / "none.json")]) == 2
    assert "none.json: cannot read it" in capsys.readouterr().err


def test_plan_takes_each_split_as_a_count_or_a_folder_as_run_does(tiny_dataset, tmp_path, capsys):
    """``--references FOLDER`` (what ``copydet run`` takes) is counted; ``--queries 100`` is a count."""
    sets = sum((["--set", s] for s in SETS), [])
    assert main(["plan", *sets, "--references", str(tiny_dataset / "references"), "--queries", "100",
                 "--train", str(tiny_dataset / "train"), "--throughput", _bench(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:4]}
    assert rows == {"query": "100", "reference": "8", "train": "6"}
    assert "wall hours on 8 device(s)" in out  # a bench file's device: a cluster of them by default
    with pytest.raises(SystemExit) as refused:
        main(["plan", *sets, "--references", str(tmp_path / "none")])
    assert refused.value.code == 2
    assert f"expected a number of images or a folder, got '{tmp_path / 'none'}'" in capsys.readouterr().err


def test_plan_refuses_what_the_stages_would_refuse(tiny_dataset, tmp_path, capsys):
    """A missing folder, no references, an unregistered model: an error naming the key, not a plan
    of zeros or of a model that is not there."""
    def err(*sets: str) -> str:
        assert main(["plan", *sum((["--set", s] for s in [*SETS, *sets]), [])]) == 2
        return capsys.readouterr().err
    assert "data.root: /nonexistent is not a folder" in err("data.root=/nonexistent")
    assert "data.references: no images to plan for" in err(f"data.queries={tiny_dataset}/queries")
    assert "data.references: no images to plan for" in err(f"data.root={tmp_path}")
    assert "models.0.name: cannot resolve model 'nosuch'" in err(f"data.root={tiny_dataset}", "models=[{name: nosuch}]")
    # a detector not trained yet is planned at its budget, and named: the run itself would stop
    assert main(["plan", *sum((["--set", s] for s in [*SETS, f"data.root={tiny_dataset}", f"registry={tmp_path}",
                                                      "patches.query.detector=nodet"]), []),
                 "--throughput", _bench(tmp_path)]) == 0
    assert "patches.query.detector: no model 'nodet'" in capsys.readouterr().err
    # given counts need no folder
    assert main(["plan", *sum((["--set", s] for s in [*SETS, "data.root=/nonexistent"]), []),
                 "--images", "10", "--throughput", str(_bench(tmp_path))]) == 0


def _bench(tmp_path) -> str:
    path = tmp_path / "tp.json"
    path.write_text(json.dumps({"images_per_s": {"tiny_cnn@64": 1.0, "tiny_cnn@96": 1.0}, "search_pairs_per_s": 1.0}))
    return str(path)


@pytest.mark.parametrize("sets, kind", [
    (["search.exact_max=5000"], "flat"),
    (["search.exact_max=2000", "search.nlist=8", "search.pq_m=8"], "ivfpq"),  # the set crosses the threshold
])
def test_plan_equals_what_the_search_stage_builds(ray_local, tmp_path, sets, kind):
    """Index kind and bytes per shard: ``copydet plan``'s numbers are what the stage's actors hold."""
    from core.store import features_table, write_table
    from jobs.layout import RunDir
    from jobs.stages.search import open_split

    cfg = load_config(None, [f"output={tmp_path}", "search.shard_size=1000", *sets])
    run = RunDir(str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(0, 2600, 900):  # files and shards cut differently
        write_table(features_table([f"R{j}" for j in range(i, min(i + 900, 2600))], [0] * len(x[i:i + 900]),
                                   "m", 32, x[i:i + 900]), f"{run.features('m@32')}/reference-{i // 900:05d}-0000.parquet")
    total, biggest, planned_kind = reference_index_memory(2600, 32, cfg.search)
    index = open_split(run, "m@32", "reference", cfg.search, 10)
    try:
        infos = index.info()
    finally:
        index.close()
    assert planned_kind == kind and {i["index"] for i in infos} == {kind}
    assert [i["rows"] for i in infos] == [1000, 1000, 600]
    built = [i["bytes"] for i in infos]
    assert max(built) == pytest.approx(biggest, rel=0.02) and sum(built) == pytest.approx(total, rel=0.02)


def test_plan_times_an_external_member_through_its_runtime(tiny_dataset, tmp_path, capsys):
    """SSCD and other imported ONNX members are timed as extraction runs them (they failed: "not a
    descriptor backbone"), beside a backbone."""
    from core.models import external
    from tests.test_external import UINT8_NHWC, export_onnx

    export_onnx(tmp_path / "net.onnx")
    external.import_external(tmp_path / "net.onnx", "tiny_onnx", registry=tmp_path / "reg", input_size=32,
                             resize="short_side", **UINT8_NHWC)
    sets = [f"data.root={tiny_dataset}", f"registry={tmp_path / 'reg'}", *SETS,
            "models=[{name: tiny_onnx, scales: [32]}, {name: tiny_cnn, scales: [64]}]"]
    assert main(["plan", *sum((["--set", s] for s in sets), []), "--images", "100"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"tiny_onnx@32", "tiny_cnn@64"} <= rows
    assert "(this machine); wall hours on 1 device(s)" in out  # measured here: this machine's wall time
