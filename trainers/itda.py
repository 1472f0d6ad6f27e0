"""ITDA (Leask et al. 2025, arXiv 2505.17769, "Inference-Time Decomposition of Activations"): a dictionary of real activations.

No gradient training. The dictionary's atoms are normalised activations: the first batch fills it with its
min(d_in, d_sae) most frequent distinct activations, and then every token that k steps of (signed) matching
pursuit on the current dictionary reconstructs badly is added as a new atom:

    x̂ = MP_k(x; D),   err(x) = mean_j (x/‖x‖ − x̂/‖x̂‖)_j²,   add x/‖x‖ to D for every token with err > loss_threshold,

in batch order, until ``d_sae`` atoms (the authors' ``crop_dict_size``; tokens beyond it are dropped). MP is
the authors' ``mp_encode``: i = argmax |⟨r, d_i⟩|, signed coefficient ⟨r, d_i⟩, no biases.

On the one loop: the step encodes the batch with the current dictionary (its FVU is the logged loss), and
``after_step`` adds the atoms. The SAE's parameters are handed to the optimizer at learning rate 0, so the
loop's Adam step leaves them as they are and only the additions change the dictionary (the loop still runs
its backward, a small waste). The number of atoms is the method's checkpointed state. The export keeps only
the atoms found (d_sae = their number) as architecture ``itda``: signed MP for k steps on W_dec, no biases.
Single process only (atoms added from a rank's slice would differ between ranks).

The cross-model Jaccard similarity of ITDA dictionaries compares the sets of *dataset positions* (sequence,
token) chosen as atoms. The training stream is shuffled and carries no position per token, so it lives in
``saebench.trainers.itda_similarity``: it builds ITDA dictionaries in corpus order with the same two rules as this
method (``initial_atom_rows``, ``poorly_reconstructed``), remembers each atom's position, and compares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from saebench.trainers.base import Method, OptionsBase, StepInput, StepOutput, normalized_mse, register
from torch import Tensor

from saebench import distributed, sparse
from saebench.config import ConfigError
from saebench.encoders import matching_pursuit
from saebench.sae import SAE, SAEConfig


def initial_atom_rows(sample: Tensor, cap: int) -> Tensor:
    """Row indices of ``sample`` [N, d] that start an ITDA dictionary: its ``cap`` most frequent distinct non-zero rows.

    Most frequent first; equal counts in ``torch.unique``'s (lexicographic) row order; each distinct row is
    represented by its first occurrence in ``sample`` (so a caller can tell *where* an atom came from).
    """
    rows, inverse, counts = torch.unique(sample.float(), dim=0, return_inverse=True, return_counts=True)
    n = sample.shape[0]
    first = torch.full((len(rows),), n, dtype=torch.long).scatter_reduce_(0, inverse.cpu(), torch.arange(n), "amin")
    order = counts.cpu().argsort(descending=True, stable=True)
    first = first[order][rows[order].norm(dim=-1).cpu() > 0]
    return first[:cap]


def poorly_reconstructed(x: Tensor, x_hat: Tensor, loss_threshold: float) -> Tensor:
    """Bool [B]: tokens ITDA adds as atoms, mean_j (x/‖x‖ − x̂/‖x̂‖)_j² > ``loss_threshold`` (zero rows never)."""
    x, x_hat = x.float(), x_hat.detach().float()
    err = (F.normalize(x, dim=-1, eps=1e-9) - F.normalize(x_hat, dim=-1, eps=1e-9)).square().mean(-1)
    return (err > loss_threshold) & (x.norm(dim=-1) > 0)


class ITDAOptions(OptionsBase):
    """ITDA's option (k, the number of pursuit steps, is the config's ``k``; the dictionary's capacity is ``d_sae``)."""


    # Add a token as an atom when mean_j (x/‖x‖ − x̂/‖x̂‖)_j² exceeds this (the authors' error; = (2 − 2cos)/d_in).
    loss_threshold: float = Field(1e-3, ge=0, description=(
        "Add a token as a new atom when mean_j (x/‖x‖ − x̂/‖x̂‖)_j² (= (2 − 2·cos(x, x̂))/d_in, the authors' error) exceeds this."))


@register
class ITDA(Method):
    """A dictionary of normalised real activations, grown greedily where matching pursuit reconstructs badly (no gradients)."""

    name = "itda"
    architecture = "itda"
    Options = ITDAOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        if distributed.world_size() > 1:
            raise ConfigError("method 'itda' runs in a single process (atoms are added from the batch a rank sees)")
        self.n_atoms = torch.zeros((), dtype=torch.long)

    def sae_config(self, d_in: int, **fields) -> SAEConfig:
        return super().sae_config(d_in, apply_b_dec_to_input=False, max_iterations=self.cfg.k, **fields)

    def param_groups(self, sae: SAE, lr: float) -> list[dict]:
        return [{"params": list(sae.parameters()), "lr": 0.0}]  # atoms change only by addition

    @torch.no_grad()
    def init_sae(self, sae: SAE, sample: Tensor, generator: torch.Generator) -> None:
        for p in sae.parameters():
            p.zero_()
        rows = sample.float()[initial_atom_rows(sample, min(sae.d_in, sae.d_sae)).to(sample.device)]
        sae.W_dec[: len(rows)] = F.normalize(rows, dim=-1).to(sae.dtype)
        self.n_atoms = torch.tensor(len(rows))

    def step(self, sae: SAE, inp: StepInput) -> StepOutput:
        acts = matching_pursuit(inp.x, sae.W_dec, self.cfg.k, signed=True)
        x_hat = sparse.decode(acts, sae.W_dec)
        return StepOutput({"mse_loss": normalized_mse(x_hat, inp.x)}, acts, x_hat)

    @torch.no_grad()
    def after_step(self, sae: SAE, inp: StepInput, out: StepOutput, step: int) -> None:
        x = inp.x.float()
        room = sae.d_sae - int(self.n_atoms)
        new = x[poorly_reconstructed(x, out.x_hat, self.opts.loss_threshold)][:room]
        n = int(self.n_atoms)
        sae.W_dec[n : n + len(new)] = F.normalize(new, dim=-1).to(sae.dtype)
        self.n_atoms = torch.tensor(n + len(new))
        out.metrics["dictionary_size"] = float(self.n_atoms)

    @torch.no_grad()
    def export(self, sae: SAE) -> SAE:
        """The atoms found, as an ``itda`` SAE of d_sae = their number."""
        n = max(int(self.n_atoms), 1)
        out = SAE(sae.cfg.model_copy(update={"d_sae": n})).to(sae.device)
        out.W_dec.copy_(sae.W_dec[:n])
        out.encoder_weight.copy_(sae.W_dec[:n])
        return out

    def state(self) -> dict[str, Tensor]:
        return {"n_atoms": self.n_atoms.reshape(1)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "n_atoms" in state:
            self.n_atoms = state["n_atoms"].reshape(()).cpu().long()
