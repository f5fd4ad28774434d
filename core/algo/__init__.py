"""The method itself: the flow-matching schedule (`scheduler`), the self-forced rollout and the replay of its
exit steps (`rollout`), the DMD / Re-DMD / critic losses (`losses`), one Re-DMD iteration's math (`distill`)
and the fp32 weight average (`ema`)."""
