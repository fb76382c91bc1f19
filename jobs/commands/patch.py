"""``copydet patch``: plan the patches of every image (a stage users also run on its own)."""
from jobs.commands.stages import stage_command

stage_command("patch", "manifest -> patches.parquet (global and geometric views)")
