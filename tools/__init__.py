"""Stand-alone tools that ship with the project but are not part of the training library (each has its own
CLI, ``python -m tools.<name>``); the library may call them (the embedded dataset is built on demand)."""
