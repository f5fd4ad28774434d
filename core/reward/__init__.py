"""Video reward models behind one interface (Ray-free): VideoReward (VideoAlign), a VLM judge,
and a deterministic motion scorer computed from pixels."""
