"""TD(lambda) value targets for terminal rewards, computed backwards like GAE (VAS_NOTES.md, "Training").

An episode is a prompt and a completion of T tokens. Its states are s_0 (the prompt) ... s_T (the prompt and
the whole completion, EOS included when there is one). The reward R arrives with the last token:
r_{T-1} = R, every other r_t = 0, and s_T is terminal (no value after it):

    delta_t  = r_t + gamma · V(s_{t+1}) − V(s_t)          (V(s_{t+1}) := 0 for t = T−1)
    A_t      = delta_t + gamma · lambda · A_{t+1}
    target_t = A_t + V(s_t)                               for t < T
    target_T = R                                          decoding queries V(s∘EOS) too
"""

from __future__ import annotations

import torch


def td_lambda_targets(
    values: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> torch.Tensor:
    """TD(lambda) targets for a batch of episodes of different lengths.

    Args:
        values: (batch, states) V(s_t) for t = 0 .. states − 1; entries past each episode's s_T are ignored.
        rewards: (batch,) the terminal reward R of each episode.
        lengths: (batch,) T, the number of completion tokens (>= 1); states 0 .. T are valid.
        gamma: Discount per token.
        lam: The TD(lambda) trace parameter: 0 bootstraps from the next state, 1 is the Monte-Carlo return.

    Returns:
        (batch, states) float32 targets; zero past each episode's s_T (mask them with `state_mask(lengths, states)`).
    """
    values = values.detach().float()
    rewards = rewards.float().to(values.device)
    lengths = lengths.to(values.device)
    batch_size, num_states = values.shape
    if int(lengths.max()) >= num_states or int(lengths.min()) < 1:
        raise ValueError(f"Every length must be in [1, {num_states - 1}], got {lengths.tolist()}")
    targets = torch.zeros_like(values)
    advantage = torch.zeros(batch_size, device=values.device)
    zero = torch.zeros((), device=values.device)
    for t in reversed(range(num_states - 1)):
        is_last = lengths == t + 1  # the transition into the terminal state s_T carries the reward
        next_value = torch.where(is_last, zero, values[:, t + 1])
        reward = torch.where(is_last, rewards, zero)
        delta = reward + gamma * next_value - values[:, t]
        advantage = torch.where(t < lengths, delta + gamma * lam * advantage, zero)
        targets[:, t] = advantage + values[:, t]
    targets[torch.arange(batch_size, device=values.device), lengths] = rewards
    return targets


def state_mask(lengths: torch.Tensor, num_states: int) -> torch.Tensor:
    """(batch, num_states) bool: True for the states s_0 .. s_T of each episode."""
    return torch.arange(num_states, device=lengths.device)[None, :] <= lengths[:, None]
