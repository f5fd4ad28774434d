"""The whole training job, wired at the top beside the roles it starts (the roles never import it).

`train.run` validates the config against the cluster, starts Ray and Serve (`cluster`), deploys the reward
service, creates the rollout pool, runs the learner under Ray Train with a `control.LearnerControl` to
follow it, and shuts everything down with a summary.
"""
