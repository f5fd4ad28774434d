"""Ray-free torch code every role shares, cut by concern:

    config.py   the one typed config schema and its YAML / key=value loader
    runtime.py  device and dtype names -> torch objects
    model/      the Wan DiT (bidirectional and causal), its KV cache, attention kernels, LoRA
    codecs/     pixels <-> latents (Wan VAE, exact patch codec) and prompts -> embeddings (umT5)
    algo/       the method: flow-matching schedule, self-forced rollout and replay, DMD / Re-DMD losses, EMA
    records/    what crosses process and disk boundaries: samples, prompt cursors, checkpoints, video files
    reward/     video reward backends behind one interface, chosen through a registry
    stream/     prompt -> frames: the pipeline and the interactive streaming session

Nothing here imports Ray or DeepSpeed (a test checks it), so the same code runs in rollout actors,
the learner, serving replicas and on a bare GPU box.
"""

import logging

# torchao (the `fp8` extra), when installed, is imported by diffusers and peft as they load, whether or not FP8 is on.
# Where its prebuilt CUDA kernels do not match the installed torch (a CPU build) it, and diffusers' check of its
# tensor types, log warnings on every start. runtime.fp8 says itself what it needs (core/model/fp8.py).
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
del _name
