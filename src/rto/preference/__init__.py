"""The DPO family's losses (DPO, IPO, R-DPO, SimPO, TDPO). RTO's token reward from a DPO model is
a reward source of the RL stage: `rto.rl.sources.dpo_log_ratio`."""
