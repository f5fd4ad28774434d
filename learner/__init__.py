"""DeepSpeed learner on Ray Train: Re-DMD generator and critic steps, EMA, checkpoints, weight publishing.

Orchestration only; losses, replay and models live in `core`.
"""
