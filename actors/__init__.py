"""Ray rollout actors: self-forced generation -> decode -> score -> sample records.

Orchestration only; the model math they run lives in `core`.
"""
