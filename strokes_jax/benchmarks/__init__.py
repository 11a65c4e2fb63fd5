"""Official benchmarks run with a trained model: GenEval (folder layout, resumable generation,
the shapes world's exact scorer, the official summary) and WISE (generation in both modes, a
judge client with a cache, the three scoring conventions side by side). docs/benchmarks.md
walks through both."""
