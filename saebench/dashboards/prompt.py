"""Live activations of an SAE on a user's prompt (the browser's prompt box)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saebench.dashboards.build import _sae_site
from saebench.sae import SAE
from saebench.text import special_ids


class PromptActs(NamedTuple):
    token_ids: list[int]
    tokens: list[str]
    special: list[bool]  # masked positions (BOS/EOS/pad): values are zeroed
    values: Tensor  # [T, K]
    indices: Tensor  # [T, K]
    n_prompt_tokens: int = 0  # tokens of the whole prompt (BOS included); > len(tokens) when it was cut

    @property
    def truncated(self) -> bool:
        return self.n_prompt_tokens > len(self.tokens)

    def latent(self, i: int) -> list[float]:
        """Activation of latent ``i`` at every position."""
        return ((self.indices == i) * self.values).sum(-1).tolist()


PROMPT_MAX_TOKENS = 512


@torch.no_grad()
def prompt_activations(model, sae: SAE, prompt: str, max_tokens: int = PROMPT_MAX_TOKENS) -> PromptActs:
    """Run ``prompt`` (BOS prepended) through the model and the SAE; special positions are zeroed.

    Holds the model's :func:`saebench.steering.model_lock` for the forward pass, so a model shared by
    threads (the browser's sessions) is never run with another thread's hooks attached.
    """
    from saebench.steering import model_lock

    site = _sae_site(sae)
    hook = site.hook
    all_toks = model.to_tokens(prompt)
    toks = all_toks[:, :max_tokens]
    with model_lock(model):
        _, cache = model.run_with_cache(toks.to(sae.device), names_filter=lambda n: n == hook, stop_at_layer=site.stop_layer)
    x = site.flatten(cache[hook])[0].float()
    acts = sae.encode_sparse(x)
    ids = toks[0].tolist()
    special = torch.isin(toks[0], special_ids(model.tokenizer)).tolist()
    values = acts.values.cpu() * ~torch.tensor(special)[:, None]
    return PromptActs(ids, [model.tokenizer.decode([t]) for t in ids], special, values, acts.indices.cpu(), int(all_toks.shape[1]))


def top_latents_per_token(acts: PromptActs, n: int = 5) -> list[list[tuple[int, float]]]:
    """For each position, the ``n`` latents with the largest |activation| (non-zero only)."""
    out = []
    for vals, idx in zip(acts.values, acts.indices):
        order = vals.abs().argsort(descending=True)[:n]
        out.append([(int(idx[j]), float(vals[j])) for j in order if vals[j] != 0])
    return out
