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
    values: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
    step_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """TD(lambda) targets for a batch of episodes of different lengths.

    Args:
        values: (batch, states) V(s_t) for t = 0 .. states − 1; entries past each episode's s_T are ignored.
        rewards: (batch,) the terminal reward R of each episode.
        lengths: (batch,) T, the number of completion tokens (>= 1); states 0 .. T are valid.
        gamma: Discount per token.
        lam: The TD(lambda) trace parameter: 0 bootstraps from the next state, 1 is the Monte-Carlo return.
        step_rewards: (batch, states) or None: r_t added to the transition s_t -> s_{t+1} for t < T (e.g. the
            zero-mean control variates of `control_variates`); entries at t >= T are ignored.

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
        if step_rewards is not None:
            reward = reward + step_rewards[:, t].float()
        delta = reward + gamma * next_value - values[:, t]
        advantage = torch.where(t < lengths, delta + gamma * lam * advantage, zero)
        targets[:, t] = advantage + values[:, t]
    targets[torch.arange(batch_size, device=values.device), lengths] = rewards
    return targets


def control_variates(estimates: torch.Tensor, probabilities: torch.Tensor, drawn: torch.Tensor, valid: torch.Tensor,
                     baselines: torch.Tensor) -> torch.Tensor:
    """Zero-mean per-step corrections of a sampled return from the base's top-k candidates at each state.

    At a state s_t the base drew a_t with probability p(a | s_t). For any estimate f(s_t, a) fixed before the
    draw, c_t = sum_{a in top-k} (p(a | s_t) − [a = a_t]) · (f(s_t, a) − b_t) has E[c_t | s_t] = 0, so the return
    R + sum_{j >= t} c_j estimates E[R | s_t] without bias; with f = Q it cancels the noise of each draw among the
    top-k (the per-decision control variates of Sutton & Barto, 7.4). b_t only lowers the variance.

    Args:
        estimates: (batch, states − 1, k) f(s_t, a_j) for the k candidates of s_0 .. s_{S−2}.
        probabilities: (batch, states − 1, k) p(a_j | s_t) under the sampling distribution.
        drawn: (batch, states − 1, k) bool, candidate j is the token drawn at s_t.
        valid: (batch, states − 1, k) bool, t < T and j a real candidate.
        baselines: (batch, states − 1) b_t.

    Returns:
        (batch, states) float32 c_t, zero at t >= T (the step rewards of `td_lambda_targets`).
    """
    weights = (probabilities.float() - drawn.float()) * valid
    corrections = (weights * (estimates.detach().float() - baselines.detach().float()[..., None])).sum(-1)
    return torch.cat([corrections, torch.zeros_like(corrections[:, :1])], dim=1)


def state_mask(lengths: torch.Tensor, num_states: int) -> torch.Tensor:
    """(batch, num_states) bool: True for the states s_0 .. s_T of each episode."""
    return torch.arange(num_states, device=lengths.device)[None, :] <= lengths[:, None]


def two_hot(values: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Each value as a distribution over evenly spaced `atoms` with the same mean: its weight split between the
    two neighbouring atoms (values outside the atoms' range are clipped to it).

    Args:
        values: (...) float.
        atoms: (A,) evenly spaced, increasing.

    Returns:
        (..., A) float32 probabilities.
    """
    low, high, count = float(atoms[0]), float(atoms[-1]), atoms.shape[0]
    position = (values.float().clamp(low, high) - low) / (high - low) * (count - 1)  # in [0, A - 1]
    lower = position.floor().long().clamp(max=count - 2)
    upper_weight = position - lower
    out = torch.zeros(*values.shape, count, device=values.device)
    out.scatter_(-1, lower[..., None], (1 - upper_weight)[..., None])
    out.scatter_add_(-1, (lower + 1)[..., None], upper_weight[..., None])
    return out


def distributional_td_lambda_targets(
    probabilities: torch.Tensor, reward_distributions: torch.Tensor, lengths: torch.Tensor, lam: float = 0.95
) -> torch.Tensor:
    """Distributional TD(lambda) targets for terminal rewards with gamma = 1 (a mixture recursion).

    The return distribution of s_t is that of s_{t+1} (no reward before the last token, no discount), so the
    lambda-return's distribution mixes the model's own next prediction with the target after it:

        target_T = target_{T-1} = the reward's distribution       (s_T is terminal; its value is R)
        target_t = (1 − lam) · p(s_{t+1}) + lam · target_{t+1}    for t < T − 1

    Its mean is the scalar TD(lambda) target of `td_lambda_targets` with gamma = 1; lam = 1 gives the reward's
    distribution at every state (Monte Carlo).

    Args:
        probabilities: (batch, states, A) the model's p(s_t); entries past each episode's s_T are ignored.
        reward_distributions: (batch, A) each episode's reward as a distribution over the atoms (`two_hot`).
        lengths: (batch,) T, completion tokens (>= 1).
        lam: The TD(lambda) trace parameter.

    Returns:
        (batch, states, A) float32 targets; zero past each episode's s_T.
    """
    probabilities = probabilities.detach().float()
    reward_distributions = reward_distributions.float().to(probabilities.device)
    lengths = lengths.to(probabilities.device)
    batch_size, num_states, _ = probabilities.shape
    if int(lengths.max()) >= num_states or int(lengths.min()) < 1:
        raise ValueError(f"Every length must be in [1, {num_states - 1}], got {lengths.tolist()}")
    targets = torch.zeros_like(probabilities)
    following = torch.zeros_like(reward_distributions)  # target_{t+1}
    for t in reversed(range(num_states)):
        at_or_after_last = (t >= lengths - 1)[:, None]  # s_{T-1} and s_T: the reward itself
        mixed = (1 - lam) * probabilities[:, min(t + 1, num_states - 1)] + lam * following
        following = torch.where(at_or_after_last, reward_distributions, mixed)
        targets[:, t] = torch.where((t <= lengths)[:, None], following, 0.0)
    return targets
