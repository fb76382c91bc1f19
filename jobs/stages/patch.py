"""Stage 2: manifest.parquet/ -> patches.parquet/ (one patch shard per manifest shard)."""
from __future__ import annotations

from ensemble.store import join, read_table, write_table
from jobs.config import PipelineConfig
from jobs.layout import RunDir, shard_names
from jobs.runtime import run_tasks
from patchers.plan import plan_table
from patchers.views import ViewConfig



def patch_shard(run: RunDir, name: str, views: ViewConfig) -> int:
    ids = read_table(join(run.manifest, name), columns=["image_id"]).column("image_id").to_pylist()
    table = plan_table(ids, views)
    write_table(table, join(run.patches, name))
    return table.num_rows


def run_patch(cfg: PipelineConfig, run: RunDir) -> None:
    done = set(shard_names(run.patches))
    calls = [(run, n, getattr(cfg.patches, n.split("-", 1)[0]))
             for n in shard_names(run.manifest) if n not in done]
    run_tasks(patch_shard, calls, "patch")
