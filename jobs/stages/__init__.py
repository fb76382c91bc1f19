"""One runner per pipeline stage: each reads the previous stage's files from the run
folder, skips the shards it already wrote, and writes its own atomically."""

# The stages in run order, by name: what the command line offers without importing the runners
# (:data:`jobs.pipeline.STAGES` maps each to its runner).
NAMES = ("manifest", "patch", "extract", "reduce", "search", "fuse", "verify")
