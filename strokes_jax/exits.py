"""Exit codes of `python -m strokes_jax`, for scripts and retry loops that run it."""

OK = 0
FAILED = 1
BAD_INPUT = 2  # a config key, a path, a record: the one-line message says which
# A preempted run saved its checkpoint and stopped early: rerun the same command to resume.
PREEMPTED = 75
