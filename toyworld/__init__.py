"""The toy world: a recipe that uses the core, not part of it.

Clips of coloured shapes with their prompts and exact measures of colour and motion (`world`), the config
sections of its recipes (`config`), what the recipes share (`recipe`: world latents, the flow-matching loss,
the optimiser), the teacher's Euler flow-ODE sampler (`sampler`), flow-matching pretraining of the teacher
(`pretrain`), ODE-regression initialisation of the causal student (`ode_init`) and the student's
evaluation (`evaluate`). The embedded default (configs/tiny.yaml) distils this world's shipped teacher
into its shipped student.
"""
