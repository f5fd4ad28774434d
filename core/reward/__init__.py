"""Video reward models behind one interface (Ray-free): the records and the interface every backend
implements (`base`), the built-in backends (`motion`: deterministic, from pixels; `videoreward`:
VideoReward / VideoAlign; `vlm_judge`: a VLM through vLLM) and the registry that builds the one a config
names (`registry`)."""
