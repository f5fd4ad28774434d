"""Ray Serve reward scoring (VideoReward, VLM judge, motion scorer) with an HTTP API and an in-cluster handle."""
