"""One runner per pipeline stage: each reads the previous stage's files from the run
folder, skips the shards it already wrote, and writes its own atomically."""
