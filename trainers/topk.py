"""TopK SAE (Gao et al. 2024, arXiv 2406.04093) with the AuxK dead-latent loss.

z = ReLU(TopK_k(W_enc(x − b_dec) + b_enc)); loss = FVU(x̂, x) + α·AuxK, α = 1/32, where AuxK
reconstructs the residual x − x̂ from the top-k_aux dead latents (k_aux = d_in/2 by default).
Everything is the shared sparse pipeline in ``trainers.base.Method``.
"""

from saebench.trainers.base import Method, register


@register
class TopK(Method):
    name = "topk"
    architecture = "topk"
