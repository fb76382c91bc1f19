"""The query service: the engine (one index version + models), uploads, the Ray Serve app and its page."""
