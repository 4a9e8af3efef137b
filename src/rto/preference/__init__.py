"""Direct preference methods (DPO, IPO, R-DPO, SimPO, TDPO) and the DPO token reward."""

from rto.preference.token_reward import dpo_token_rewards

__all__ = ["dpo_token_rewards"]
