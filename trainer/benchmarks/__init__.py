"""The paper's benchmarks on a user's own files: the human-centric prompt sets (prompts), and the evaluation that
scores models on them (next)."""
