"""The value model's training loop for fit(): TD(lambda) losses, epochs, held-out evaluation, checkpoints.

fit() (fit.py) gathers the samples and builds the value model; `Trainer` runs the optimisation on them:

    loss = 0.5 · masked MSE of V(s_t) to its TD(lambda) target (scalar and token heads), or the cross-entropy
           to the distributional TD(lambda) target (distributional head); AdamW; gradient-norm clipping
    prefix = with prefix rewards (prefix_rewards.py, scalar or token head): V = phi + u, phi a second linear head
           of the same kind on the same features trained on the prefix rewards and their increments, u on V's TD
           targets with phi held fixed; phi is added into the value head when training ends (one head, as saved).
           With candidate rewards (candidate_rewards.py), phi learns each candidate's contrast to the drawn token:
           a scalar head values the candidates appended to the batch (a 4-D mask: each sees its prefix and
           itself), a token head reads them at their state, as it does the drawn token. With their sampling
           probabilities, u's targets are corrected by zero-mean control variates
           (targets.control_variates) that replace which of the top-k was drawn by its expectation

A checkpoint (weights, best weights, optimizer and RNG state, counters and the training settings) is written
each epoch and on Ctrl-C, and resumed only with the same settings (run_dir.py keeps the folders). Progress
within an epoch is counted in samples, so a run resumed with another batch size goes on with the samples
that epoch has not seen; Ctrl-C is held while an update and its counters move, so none is applied twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .prefix_rewards import PrefixRewards
from .processor import attention_layout
from .run_dir import COMPLETE_MARKER, RunDirectory
from .sampling import Sample, pad_batch
from .stream import additive_mask, within_window
from .targets import control_variates, distributional_td_lambda_targets, state_mask, td_lambda_targets, two_hot
from .value_model import WEIGHTS_NAME, token_values

logger = logging.getLogger(__name__)

BEST_NAME = "best_model.safetensors"  # in a checkpoint: the weights of the best epoch so far (phi added in)
PREFIX_HEAD_NAME = "prefix_head.safetensors"  # in a checkpoint: phi, the prefix head, while training


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it: an optimizer update and the counters that
    record it move together, so a resumed run neither repeats nor skips a batch. Only where Python's default
    handler is installed, in the main thread (elsewhere no KeyboardInterrupt arrives)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    state_positions: torch.Tensor  # (B, S) where V(s_t) is read: the last token of prompt + t completion tokens
    lengths: torch.Tensor  # (B,) completion lengths T
    rewards: torch.Tensor  # (B,)
    first_states: torch.Tensor  # (B,) the first state trained on (0 but for sibling rollouts)
    prefix_rewards: torch.Tensor | None = None  # (B, S) r_t of each state s_t (prefix_rewards.py), when scored
    # With candidate rewards (candidate_rewards.py), the k candidates of each state s_0 .. s_{S−2} follow the
    # sequence: input_ids is then (B, L + (S − 1) k) and these are set:
    allowed: torch.Tensor | None = None  # (B, L', L') bool: which column each column attends to
    position_ids: torch.Tensor | None = None  # (B, L')
    candidate_ids: torch.Tensor | None = None  # (B, S − 1, k) candidate j's token id at state s_t
    candidate_columns: torch.Tensor | None = None  # (B, S − 1, k) its column (appended candidates only)
    candidate_rewards: torch.Tensor | None = None  # (B, S − 1, k) r(s_t∘a_j)
    candidate_valid: torch.Tensor | None = None  # (B, S − 1, k) t < T
    candidate_probs: torch.Tensor | None = None  # (B, S − 1, k) p(a_j | s_t) of sampling, when known
    candidate_drawn: torch.Tensor | None = None  # (B, S − 1, k) a_j is the token drawn at s_t


def collate(samples: Sequence[Sample], pad_token_id: int, device, candidates: bool = False,
            append: bool = True) -> Batch:
    """A right-padded batch; `candidates`: with each state's candidates (when all samples have them), appended to
    the sequences to be valued as their own prefixes (`append`, a V(s∘a) head) or only listed (a token head reads
    Q(s_t, a) at s_t itself)."""
    input_ids, attention_mask = pad_batch([s.prompt_ids + s.completion_ids for s in samples], pad_token_id, "right")
    width = input_ids.shape[1]
    lengths = torch.tensor([len(sample.completion_ids) for sample in samples])
    prompt_lengths = torch.tensor([len(sample.prompt_ids) for sample in samples])
    num_states = int(lengths.max()) + 1
    state_positions = prompt_lengths[:, None] - 1 + torch.arange(num_states)[None, :]
    state_positions = state_positions.clamp(max=width - 1)  # past s_T: masked, any valid index will do
    rewards = torch.tensor([sample.reward for sample in samples])
    first_states = torch.tensor([sample.first_state for sample in samples])
    prefix_rewards = None
    if all(sample.prefix_rewards is not None for sample in samples):  # r_0 .. r_T, padded with R past s_T
        padded = [s.prefix_rewards + [s.reward] * (num_states - len(s.prefix_rewards)) for s in samples]
        prefix_rewards = torch.tensor(padded)
    batch = Batch(input_ids, attention_mask, state_positions, lengths, rewards, first_states, prefix_rewards)
    if candidates and all(sample.candidate_ids is not None for sample in samples):
        _list_candidates(batch, samples, prompt_lengths)
        if append:
            _append_candidates(batch, prompt_lengths)
    return Batch(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                    for name, value in vars(batch).items()})


def _list_candidates(batch: Batch, samples: Sequence[Sample], prompt_lengths: torch.Tensor) -> None:
    """Set the batch's candidate ids, rewards, validity and (when known) sampling probabilities, (B, S − 1, k)."""
    batch_size, width = batch.input_ids.shape
    num_states = batch.state_positions.shape[1] - 1  # s_0 .. s_{S−2}: the states with a next token
    top_k = max((len(row) for sample in samples for row in sample.candidate_ids), default=1)
    ids = torch.zeros(batch_size, num_states, top_k, dtype=torch.long)
    rewards = torch.zeros(batch_size, num_states, top_k)
    valid = torch.zeros(batch_size, num_states, top_k, dtype=torch.bool)
    with_probs = all(sample.candidate_probs is not None for sample in samples)
    probs = torch.zeros(batch_size, num_states, top_k)
    for row, sample in enumerate(samples):
        for t, (tokens, values) in enumerate(zip(sample.candidate_ids, sample.candidate_rewards)):
            ids[row, t, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            rewards[row, t, : len(values)] = torch.tensor(values)
            valid[row, t, : len(tokens)] = True
            if with_probs:
                probs[row, t, : len(tokens)] = torch.tensor(sample.candidate_probs[t])
    state_ends = prompt_lengths[:, None] - 1 + torch.arange(num_states)[None, :]  # (B, S − 1) last column of s_t
    if with_probs:  # the token drawn at s_t is the sequence's next column
        drawn_tokens = batch.input_ids.gather(1, (state_ends + 1).clamp(max=width - 1))  # (B, S − 1)
        batch.candidate_probs, batch.candidate_drawn = probs, (ids == drawn_tokens[..., None]) & valid
    batch.candidate_ids, batch.candidate_rewards, batch.candidate_valid = ids, rewards, valid


def _append_candidates(batch: Batch, prompt_lengths: torch.Tensor) -> None:
    """Append the listed candidates of every state after the padded sequences, each attending to its own prefix
    (the columns up to its state's last token) and to itself, at the position of the next token."""
    batch_size, width = batch.input_ids.shape
    num_states, top_k = batch.candidate_ids.shape[1:]
    extra = num_states * top_k
    total = width + extra
    state_ends = prompt_lengths[:, None] - 1 + torch.arange(num_states)[None, :]  # (B, S − 1) last column of s_t
    limit = state_ends[..., None].expand(-1, -1, top_k).reshape(batch_size, extra)  # (B, E) its last visible column
    columns = torch.arange(total)
    real = batch.attention_mask.bool()
    allowed = torch.zeros(batch_size, total, total, dtype=torch.bool)
    allowed[:, :width, :width] = real[:, None, :] & (columns[None, :width, None] >= columns[None, None, :width])
    allowed[:, :width, :width] |= torch.eye(width, dtype=torch.bool)  # even a pad sees itself: no empty rows
    allowed[:, width:, :width] = real[:, None, :] & (columns[None, None, :width] <= limit[..., None])
    allowed[:, width:, width:] = torch.eye(extra, dtype=torch.bool)
    batch.input_ids = torch.cat([batch.input_ids, batch.candidate_ids.reshape(batch_size, extra)], dim=1)
    batch.position_ids = torch.cat([torch.arange(width).expand(batch_size, -1), limit + 1], dim=1)  # next token's
    batch.allowed = allowed
    batch.candidate_columns = width + torch.arange(extra).reshape(num_states, top_k).expand(batch_size, -1, -1)


def additive_masks(allowed: torch.Tensor, position_ids: torch.Tensor, layout, dtype: torch.dtype):
    """(B, 1, L, L) additive float masks from `allowed` (B, L, L) for a backbone of this attention layout
    (processor.attention_layout): one, or a dict per layer type when sliding layers see less."""
    layer_types, window = layout
    by_type = {}
    for layer_type in set(layer_types):
        keep = allowed
        if layer_type == "sliding_attention":
            keep = allowed & within_window(position_ids, position_ids, window)
        by_type[layer_type] = additive_mask(keep, dtype)
    return next(iter(by_type.values())) if len(by_type) == 1 else by_type


class TokenPrefixHead(torch.nn.Module):
    """phi for a token head: phi(s, a) = head(h_s) · e_a + token_bias[a], shaped like the value model's own token
    head (the same parameter names), so that phi + u is again one token head."""

    def __init__(self, hidden_size: int, vocab_size: int, device, dtype):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)
        self.token_bias = torch.nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype))
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)


def trained_states(batch: Batch, num_states: int) -> torch.Tensor:
    """(B, num_states) bool: the states each episode trains, s_{first_state} .. s_T."""
    states = torch.arange(num_states, device=batch.lengths.device)[None, :]
    return state_mask(batch.lengths, num_states) & (states >= batch.first_states[:, None])


class Trainer:
    """The optimisation loop, its checkpoints and its evaluation; fit() is the public face."""

    def __init__(self, value_model, learning_rate, max_grad_norm, gamma, lam, pad_token_id, rank, world_size,
                 run: RunDirectory | None, progress, keep_best, extra_settings: dict | None = None,
                 prefix_rewards: PrefixRewards | None = None):
        self.value_model, self.max_grad_norm, self.gamma, self.lam = value_model, max_grad_norm, gamma, lam
        self.pad_token_id, self.rank, self.world_size = pad_token_id, rank, world_size
        self.run, self.progress, self.keep_best = run, progress and rank == 0, keep_best
        self.extra_settings = extra_settings or {}  # recorded in checkpoints and checked on resume, like the rest
        self.started = False  # whether train() has run (and resumed from the checkpoint) yet
        self.best_error, self.best_state = math.inf, None  # the held-out error and weights of the best epoch
        self.device = value_model.device
        self.model = DistributedDataParallel(value_model) if world_size > 1 else value_model
        self.prefix_rewards, self.prefix_head = prefix_rewards, None
        parameters = list(value_model.parameters())
        if prefix_rewards is not None:
            if value_model.distributional:
                raise ValueError("`prefix_rewards` trains a second head added into the value head: it needs "
                                 "head='scalar' or 'token', not 'distributional' (pass prefix_rewards=None)")
            # phi, zero at the start like the value head; outside DDP, so its gradients are averaged by hand
            hidden_size = value_model.backbone_config.hidden_size
            if value_model.token_head:
                self.prefix_head = TokenPrefixHead(hidden_size, value_model.backbone_config.vocab_size, self.device,
                                                   value_model.dtype)
            else:
                self.prefix_head = torch.nn.Linear(hidden_size, 1, device=self.device, dtype=value_model.dtype)
                torch.nn.init.zeros_(self.prefix_head.weight)
                torch.nn.init.zeros_(self.prefix_head.bias)
            parameters += list(self.prefix_head.parameters())
        # the attention layout appended candidates' masks are built for (refused now if the processor cannot mask
        # it); a token head values candidates at their state and appends none
        self.layout = attention_layout(value_model) if prefix_rewards is not None and prefix_rewards.candidates \
            and not value_model.token_head else None
        self.optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        # samples_in_epoch: how many of this process's samples (in the epoch's order) the current epoch has trained on
        self.epoch, self.samples_in_epoch, self.global_step = 0, 0, 0

    @property
    def reward_mean(self) -> float:  # read when used: fit() standardises the rewards after the trainer is built
        return self.value_model.config.reward_mean or 0.0

    @property
    def reward_std(self) -> float:
        return self.value_model.config.reward_std or 1.0

    def check_step(self) -> None:
        """One forward and backward pass of the training loss on a dummy batch, before any sampling, so that a
        value model that cannot train, or a torch / transformers release that breaks it, costs a second rather
        than the whole sampling run. The weights, their gradients and the train/eval mode are left as they were."""
        vocab_size = self.value_model.backbone_config.vocab_size
        token = 0 if self.pad_token_id != 0 or vocab_size < 2 else 1
        dummy = [Sample(0, [token, token], [token, token, token], 0.0), Sample(1, [token], [token], 1.0)]
        if self.prefix_head is not None:
            with_candidates = bool(self.prefix_rewards.candidates)
            candidates = [dict(candidate_ids=[[token]] * length, candidate_rewards=[[0.5]] * length)
                          if with_candidates else {} for length in (3, 1)]
            dummy = [Sample(0, [token, token], [token, token, token], 0.0, prefix_rewards=[0.0, 0.5, 1.0, 0.0],
                            **candidates[0]),
                     Sample(1, [token], [token], 1.0, prefix_rewards=[1.0, 1.0], **candidates[1])]
        was_training = self.value_model.training
        parameters = self._parameters()
        saved_grads = [parameter.grad for parameter in parameters]
        model, self.model = self.model, self.value_model  # not through DDP: no collective for a dry run
        self.value_model.train()
        try:
            loss = self.losses(self.collate(dummy, candidates=True))[0]
            loss.backward()
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"a training step on a dummy batch gave a non-finite loss ({loss.item()})")
            if all(parameter.grad is None for parameter in self.value_model.parameters()):
                raise ValueError("no weight of the value model received a gradient (all frozen?)")
        except Exception as error:
            raise RuntimeError(
                f"The value model cannot be trained: one forward/backward pass on a dummy batch failed before "
                f"sampling (torch {torch.__version__}, transformers {transformers.__version__}): {error}"
            ) from error
        finally:
            self.model = model
            for parameter, grad in zip(parameters, saved_grads):
                parameter.grad = grad
            self.value_model.train(was_training)

    def collate(self, samples: Sequence[Sample], candidates: bool = False) -> Batch:
        """A batch of `samples` for this value model: candidates appended for a V(s∘a) head, listed for a token
        head."""
        return collate(samples, self.pad_token_id, self.device, candidates=candidates,
                       append=not self.value_model.token_head)

    def losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss to the TD(lambda) targets: 0.5 · masked MSE (scalar head) or masked cross-entropy
        (distributional head). Also returns the state values (B, S), the rewards in the model's units (B,) and
        the state mask (B, S)."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        rewards = (batch.rewards - self.reward_mean) / self.reward_std
        with_prefix = self.prefix_head is not None
        if self.value_model.token_head:
            return self._token_losses(batch, rewards, autocast)
        attention_mask = batch.attention_mask
        if batch.allowed is not None:  # candidates appended: each sees its prefix and itself
            attention_mask = additive_masks(batch.allowed, batch.position_ids, self.layout, self.value_model.dtype)
        with autocast:
            output = self.model(input_ids=batch.input_ids, attention_mask=attention_mask,
                                position_ids=batch.position_ids, return_hidden=with_prefix)
            phi = self.prefix_head(output.hidden).float().squeeze(-1) if with_prefix else None  # (B, L)
        state_values = output.values.float().gather(1, batch.state_positions)  # (B, S)
        mask = trained_states(batch, state_values.shape[1])
        if with_prefix:
            phi_candidates = None
            if batch.candidate_columns is not None:  # (B, S − 1, k) phi(s_t∘a_j), each valued at its own column
                phi_candidates = phi.gather(1, batch.candidate_columns.flatten(1)).view(batch.candidate_columns.shape)
            return self._prefix_losses(batch, phi.gather(1, batch.state_positions), phi_candidates, state_values,
                                       rewards, mask)
        if self.value_model.distributional:
            index = batch.state_positions[..., None].expand(-1, -1, output.logits.shape[-1])
            log_probs = output.logits.float().gather(1, index).log_softmax(-1)  # (B, S, A)
            reward_distributions = two_hot(rewards, self.value_model.atoms)  # (B, A)
            targets = distributional_td_lambda_targets(log_probs.exp(), reward_distributions, batch.lengths, self.lam)
            loss = (-(targets * log_probs).sum(-1) * mask).sum() / mask.sum()
        else:
            targets = td_lambda_targets(state_values, rewards, batch.lengths, self.gamma, self.lam)
            loss = 0.5 * ((state_values - targets) ** 2 * mask).sum() / mask.sum()
        return loss, state_values, rewards, mask

    def _token_losses(self, batch: Batch, rewards: torch.Tensor, autocast):
        """The token head's losses. Q(s_t, a_t) of the token taken at each state is the value of the next state
        s_{t+1}: the same TD targets over states s_1 .. s_T (s_0, valued by no taken token, is a dummy that no
        target uses). With prefix rewards, phi(s_t, ·) is read at s_t for the taken token and the listed
        candidates alike: one position per state, no candidate appended."""
        next_ids = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)  # (B, L): id after each
        asked = next_ids[..., None]  # (B, L, 1 + k): the taken token, then (at states) the candidates
        taken_at = batch.state_positions[:, :-1]  # (B, S − 1): where s_t ends, t < T
        if batch.candidate_ids is not None:
            listed = torch.zeros(*next_ids.shape, batch.candidate_ids.shape[-1], dtype=torch.long,
                                 device=next_ids.device)
            listed.scatter_(1, taken_at[..., None].expand_as(batch.candidate_ids), batch.candidate_ids)
            asked = torch.cat([asked, listed], dim=-1)
        with_prefix = self.prefix_head is not None
        with autocast:
            output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, next_tokens=asked,
                                return_hidden=with_prefix)  # values (B, L, 1 + k)
            phi_all = token_values(self.prefix_head.head, self.prefix_head.token_bias,
                                   self.value_model.backbone.get_input_embeddings().weight, output.hidden,
                                   asked) if with_prefix else None

        def at_states(values: torch.Tensor) -> torch.Tensor:  # (B, L, 1 + k) -> (B, S − 1, 1 + k) at s_0 .. s_{S−2}
            return values.float().gather(1, taken_at[..., None].expand(-1, -1, values.shape[-1]))

        def as_states(taken: torch.Tensor) -> torch.Tensor:  # (B, S − 1) -> (B, S) = dummy, V(s_1) .. V(s_T)
            return torch.cat([torch.zeros_like(taken[:, :1]), taken], dim=1)

        u = at_states(output.values)
        state_values = as_states(u[..., 0])
        mask = trained_states(batch, state_values.shape[1])
        mask[:, 0] = False
        if with_prefix:
            phi = at_states(phi_all)
            phi_candidates = phi[..., 1:] if batch.candidate_ids is not None else None
            return self._prefix_losses(batch, as_states(phi[..., 0]), phi_candidates, state_values, rewards, mask)
        targets = td_lambda_targets(state_values, rewards, batch.lengths, self.gamma, self.lam)
        loss = 0.5 * ((state_values - targets) ** 2 * mask).sum() / mask.sum()
        return loss, state_values, rewards, mask

    def _prefix_losses(self, batch: Batch, phi: torch.Tensor, phi_candidates: torch.Tensor | None, u: torch.Tensor,
                       rewards: torch.Tensor, mask: torch.Tensor):
        """V = phi + u (module docstring): V's TD loss trains u (phi held fixed), phi's own loss the prefix rewards
        r_t (states s_1 .. s_T: r_0 is never scored), their increments (not for samples without them: given
        samples) and, with candidates, each candidate's contrast to the drawn token. phi, u, mask: (B, S) at the
        states (mask: those V's TD loss trains); phi_candidates: (B, S − 1, k) phi(s_t∘a_j) of the listed
        candidates."""
        values = phi.detach() + u
        with_next = trained_states(batch, phi.shape[1])[:, :-1, None]  # (B, S − 1, 1): s_t trained, a token follows
        # in the value's units: r_t (B, S) and r(s_t∘a) (B, S − 1, k)
        prefix = None if batch.prefix_rewards is None else (batch.prefix_rewards - self.reward_mean) / self.reward_std
        candidates = None if batch.candidate_rewards is None else \
            (batch.candidate_rewards - self.reward_mean) / self.reward_std
        corrections = None  # the candidates' control variates (targets.control_variates)
        if batch.candidate_probs is not None and prefix is not None and self.prefix_rewards.control_variates:
            # b_t = r_t, known before the draw at s_t; but r_0 repeats r_1 (the empty completion is not scored),
            # which depends on the draw: at s_0 the candidates' mean reward instead
            baselines = prefix[:, :-1].clone()
            weights = batch.candidate_probs[:, 0] * batch.candidate_valid[:, 0]
            baselines[:, 0] = (weights * candidates[:, 0]).sum(-1) / weights.sum(-1).clamp(min=1e-12)
            corrections = control_variates(candidates, batch.candidate_probs, batch.candidate_drawn,
                                           batch.candidate_valid & with_next, baselines)
        targets = td_lambda_targets(values, rewards, batch.lengths, self.gamma, self.lam, corrections)
        loss = 0.5 * ((values - targets) ** 2 * mask).sum() / mask.sum()
        if prefix is None:
            return loss + 0.0 * phi.sum(), (phi + u).detach(), rewards, mask  # phi in the graph all the same
        scored = mask.clone()
        scored[:, 0] = False
        if scored.any():
            loss = loss + self.prefix_rewards.weight * 0.5 * ((phi - prefix) ** 2 * scored).sum() / scored.sum()
        steps = scored[:, 1:] & scored[:, :-1]  # increments r_t − r_{t−1} between two scored states
        if steps.any():
            increments = (phi[:, 1:] - phi[:, :-1]) - (prefix[:, 1:] - prefix[:, :-1])
            loss = loss + self.prefix_rewards.increment_weight * 0.5 * (increments ** 2 * steps).sum() / steps.sum()
        valid = batch.candidate_valid & with_next if phi_candidates is not None else None
        if valid is not None and valid.any():  # phi(s_t∘a) − phi(s_{t+1}) against r(s_t∘a) − r_{t+1}
            contrasts = (phi_candidates - phi[:, 1:, None]) - (candidates - prefix[:, 1:, None])
            loss = loss + self.prefix_rewards.increment_weight * 0.5 * (contrasts ** 2 * valid).sum() / valid.sum()
        return loss, (phi + u).detach(), rewards, mask

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The value model's weights with phi added into its head: the model V = phi + u as one scalar head."""
        state = {key: value.detach().clone() for key, value in self.value_model.state_dict().items()}
        if isinstance(self.prefix_head, TokenPrefixHead):  # the same names as the token head's own parameters
            for key, value in self.prefix_head.state_dict().items():
                state[key] += value.detach()
        elif self.prefix_head is not None:
            state["head.weight"] += self.prefix_head.weight.detach()
            state["head.bias"] += self.prefix_head.bias.detach()
        return state

    @contextlib.contextmanager
    def merged(self):
        """The value model as V = phi + u while the block runs (a roll-in round decodes with it), then as it was."""
        if self.prefix_head is None:
            yield
            return
        saved = {key: value.detach().clone() for key, value in self.value_model.state_dict().items()}
        self.value_model.load_state_dict(self.merged_state())
        try:
            yield
        finally:
            self.value_model.load_state_dict(saved)

    def train(self, train_samples, eval_samples, epochs, batch_size, seed, final: bool = True,
              first_epoch: int = 0) -> None:
        """Train until `epochs` epochs are done in all (resuming from the run's checkpoint on the first call).
        `final`: the last call (roll-in rounds call it once per round): then the best epoch's weights are loaded.
        `first_epoch`: where this call's epochs begin; keep_best chooses among them only (a roll-in round's data
        move V away from the base's own states, where the held-out error is measured)."""
        if not self.started:
            self.settings = {"lam": self.lam, "gamma": self.gamma, "max_grad_norm": self.max_grad_norm, "seed": seed,
                             "head": self.value_model.config.head, "batch_size": batch_size,
                             "reward_mean": self.value_model.config.reward_mean,
                             "reward_std": self.value_model.config.reward_std, **self.extra_settings}
            self._resume()
            self.started = True
            if final and self.epoch >= epochs:
                logger.warning("Training already finished (%d epochs) in %s: returning that model (pass more epochs "
                               "to continue it)", self.epoch, self.run.path)
        if self.epoch == first_epoch and self.samples_in_epoch == 0:  # a round starts: its own best epoch
            self.best_error, self.best_state = math.inf, None
        try:
            while self.epoch < epochs:
                order = self._epoch_order(len(train_samples), seed + self.epoch)
                starts = range(self.samples_in_epoch, len(order), batch_size)
                done = -(-self.samples_in_epoch // batch_size)
                bar = tqdm(total=done + len(starts), initial=done, desc=f"epoch {self.epoch + 1}/{epochs}",
                           unit="step", disable=not self.progress)
                self.value_model.train()
                for start in starts:
                    indices = order[start : start + batch_size]
                    batch = self.collate([train_samples[i] for i in indices], candidates=True)
                    loss = self.losses(batch)[0]
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self._average_prefix_gradients()
                    torch.nn.utils.clip_grad_norm_(self._parameters(), self.max_grad_norm)
                    with interrupts_held():  # the update and the counters that record it, together
                        self.optimizer.step()
                        self.samples_in_epoch = start + len(indices)
                        self.global_step += 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.close()
                metrics = self.evaluate(eval_samples, batch_size)  # before the epoch counts as done: an
                if metrics:                                         # interrupt here evaluates it on resume
                    logger.info("epoch %d: held-out loss %.4f, error %.4f, correlation of V with the reward %.3f",
                                self.epoch + 1, metrics["loss"], metrics["error"], metrics["correlation"])
                    if self.keep_best and metrics["error"] < self.best_error:
                        self.best_error = metrics["error"]
                        self.best_state = self.merged_state()
                with interrupts_held():
                    self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                self._save_checkpoint()
        except KeyboardInterrupt:
            self._save_checkpoint()
            logger.warning("Interrupted: checkpoint written to %s; call fit() again to resume",
                           self.run.checkpoint if self.run else "(no output_dir: nothing)")
            raise
        if final and self.best_state is not None:
            logger.info("Keeping the weights of the epoch with the lowest held-out error (%.4f)", self.best_error)
            self.value_model.load_state_dict(self.best_state)
        elif final:
            self.value_model.load_state_dict(self.merged_state())
        if final and self.prefix_head is not None:  # phi now lives in the value head
            with torch.no_grad():
                for parameter in self.prefix_head.parameters():
                    parameter.zero_()

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]

    def _average_prefix_gradients(self) -> None:
        """DDP averages the value model's gradients; phi's (hidden + 1 numbers) are averaged here."""
        if self.prefix_head is None or self.world_size == 1:
            return
        for parameter in self.prefix_head.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= self.world_size

    def _epoch_order(self, num_samples: int, seed: int) -> list[int]:
        """This process's samples in the epoch's order: one shuffled order for all, padded so that every process
        gets as many."""
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
        order += order[: (-len(order)) % self.world_size]
        return order[self.rank :: self.world_size]

    @torch.no_grad()
    def evaluate(self, samples, batch_size) -> dict[str, float]:
        """Held-out loss; error = mean squared error of V(s_t) against the episode's reward over every state (what
        the value estimates, free of the model's own bootstrapped targets); and the Pearson correlation of the two."""
        if not samples:
            return {}
        self.value_model.eval()
        total_loss, predictions, rewards = 0.0, [], []
        for start in range(0, len(samples), batch_size):
            batch = self.collate(samples[start : start + batch_size])
            loss, state_values, batch_rewards, mask = self.losses(batch)
            total_loss += loss.item() * len(batch.rewards)
            predictions.append(state_values[mask])
            rewards.append(batch_rewards[:, None].expand_as(mask)[mask])
        stacked = torch.stack([torch.cat(predictions), torch.cat(rewards)])
        correlation = torch.corrcoef(stacked)[0, 1].item() if stacked[1].std() > 0 else float("nan")
        error = (stacked[0] - stacked[1]).pow(2).mean().item()
        return {"loss": total_loss / len(samples), "error": error, "correlation": correlation}

    # ------------------------------------------------------------------ checkpoints

    def _check_settings(self, state: dict, directory: Path) -> None:
        """Refuse to continue a checkpoint trained otherwise: its weights would silently be another run's. The
        number of epochs, the learning rate and the batch size may change."""
        stored = state.get("training")
        if stored is None:
            raise ValueError(f"The checkpoint in {directory} does not record its training settings (written before "
                             "vas_logits 0.4): delete that folder to train again on the stored samples")
        allowed = {"batch_size", "rounds"}  # more rounds continue a run, as more epochs do
        changed = [f"{key}: checkpoint {stored.get(key)!r}, now {value!r}" for key, value in self.settings.items()
                   if key not in allowed and stored.get(key) != value]
        if changed:
            raise ValueError(
                f"The checkpoint in {directory} was trained with other settings (" + "; ".join(changed) + "). To "
                f"continue it, pass the checkpoint's values; to train anew on the stored samples (they are kept), "
                f"delete {directory} and {self.run.final}"
            )

    def _save_checkpoint(self) -> None:
        if self.run is None or self.rank != 0:
            return

        def write(folder: Path) -> None:
            self.value_model.save_pretrained(folder)
            if self.prefix_head is not None:
                save_file({k: v.contiguous().cpu() for k, v in self.prefix_head.state_dict().items()},
                          str(folder / PREFIX_HEAD_NAME))
            if self.best_state is not None:
                save_file({k: v.contiguous().cpu() for k, v in self.best_state.items()}, str(folder / BEST_NAME))
            torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                       folder / "training_state.pt")
            state = {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch, "global_step": self.global_step,
                     "best_error": self.best_error if self.best_state is not None else None,
                     "training": self.settings}
            (folder / COMPLETE_MARKER).write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete

        self.run.write_checkpoint(write)

    def _resume(self) -> None:
        directory = self.run.latest_checkpoint() if self.run else None
        if directory is None:
            return
        state = json.loads((directory / COMPLETE_MARKER).read_text())
        weights = load_file(str(directory / WEIGHTS_NAME), device=str(self.device))
        try:
            self.value_model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"The checkpoint in {directory} belongs to another value model (other layers or sizes): use a new "
                f"output_dir, or overwrite_output_dir=True to start over. {error}"
            ) from error
        self._check_settings(state, directory)
        if self.prefix_head is not None:
            self.prefix_head.load_state_dict(load_file(str(directory / PREFIX_HEAD_NAME), device=str(self.device)))
        training_state = torch.load(directory / "training_state.pt", map_location=self.device, weights_only=True)
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(training_state["optimizer"])
        for group, learning_rate in zip(self.optimizer.param_groups, learning_rates):
            if group["lr"] != learning_rate:
                logger.info("Resuming at the learning rate given now (%g), not the checkpoint's (%g)", learning_rate,
                            group["lr"])
            group["lr"] = learning_rate  # the optimizer's saved state would keep the old one
        torch.set_rng_state(training_state["torch_rng"].cpu())
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        if "samples_in_epoch" in state:
            self.samples_in_epoch = state["samples_in_epoch"]
        else:  # written by vas_logits <= 0.4: steps of the checkpoint's batch size, each full within an epoch
            self.samples_in_epoch = state["step_in_epoch"] * state["training"]["batch_size"]
        if state.get("best_error") is not None and (directory / BEST_NAME).exists():
            self.best_error = state["best_error"]
            self.best_state = load_file(str(directory / BEST_NAME), device=str(self.device))
        logger.info("Resuming from %s: epoch %d, %d samples into it", directory, self.epoch, self.samples_in_epoch)
