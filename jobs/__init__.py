"""copydet jobs: the command line and the Ray runners of each stage."""
