"""Ray-free model code shared by every role: the Wan DiT (bidirectional and causal with the
EMA-sink KV cache), the flow-matching scheduler, self-forced rollout and replay, checkpoint IO
and the config schema. Nothing here imports Ray."""
