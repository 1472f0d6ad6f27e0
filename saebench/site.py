"""Where an SAE reads a model: one hook, optionally one attention head. The one place that parses a hook
name and knows its layer.

A site is written ``blocks.3.hook_resid_post`` (the whole activation) or ``blocks.3.attn.hook_z:5`` (head 5
of an attention hook whose activation is [batch, pos, heads, d_head]); an SAE's ``cfg.json`` may instead
name the head in ``hook_head_index``. ``hook_z`` without a head means all heads concatenated.

- :attr:`Site.block`: the block index of ``blocks.<i>.…`` hooks, None for every other hook;
- :attr:`Site.layer`: the block index, 0 for the embedding hooks (``hook_embed``, ``hook_pos_embed``,
  ``embed.*``, ``pos_embed.*``), None after the blocks (``ln_final.*``, ``unembed.*``) or unknown;
- :attr:`Site.stop_layer`: the ``stop_at_layer`` that still runs the hook (``layer + 1``), None to run the
  whole model;
- :meth:`Site.flatten` / :meth:`Site.unflatten`: the SAE's [batch, pos, d] view of the hook's activation,
  and writing such a view back into the activation's own shape.

Whether the hook exists in a given model is :func:`saebench.models.validate_hook_name`'s job.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_EMBED_PREFIXES = ("hook_embed", "embed.", "hook_pos_embed", "pos_embed.")


class Site(NamedTuple):
    """A hook name and an optional attention head (see the module docstring); unpacks as ``hook, head = site``."""

    hook: str
    head: int | None = None

    @classmethod
    def parse(cls, spec: str, head: int | None = None) -> Site:
        """``'blocks.3.attn.hook_z:5'`` → ``Site('blocks.3.attn.hook_z', 5)``; without ``:H`` the site has ``head``.

        Raises ValueError for an empty name or a ``:`` suffix that is not a head index.
        """
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"a hook name is needed (e.g. 'blocks.3.hook_resid_post'), got {spec!r}")
        if ":" in spec:
            name, h = spec.rsplit(":", 1)
            if not h.isdigit():
                raise ValueError(f"hook {spec!r}: the part after ':' must be a head index")
            return cls(name, int(h))
        return cls(spec, head)

    @classmethod
    def of_sae(cls, sae) -> Site:
        """The site of an SAE (or of its cfg): ``cfg.hook_name``, with ``:H`` or ``cfg.hook_head_index`` as the head."""
        cfg = getattr(sae, "cfg", sae)
        name = cfg.hook_name
        if not name:
            raise ValueError("the SAE's cfg has no hook_name; it cannot be attached to a model")
        return cls.parse(name, cfg.hook_head_index)

    def __str__(self) -> str:
        return self.hook if self.head is None else f"{self.hook}:{self.head}"

    # ---- position in the model ------------------------------------------------------------------
    @property
    def block(self) -> int | None:
        """Block index of a ``blocks.<i>.…`` hook; None for hooks outside the blocks."""
        m = _BLOCK_RE.match(self.hook)
        return int(m.group(1)) if m else None

    @property
    def is_embedding(self) -> bool:
        return self.hook.startswith(_EMBED_PREFIXES)

    @property
    def layer(self) -> int | None:
        """Block index; 0 for the embedding hooks; None after the blocks (``ln_final``, ``unembed``) or unknown."""
        b = self.block
        if b is not None:
            return b
        return 0 if self.is_embedding else None

    @property
    def stop_layer(self) -> int | None:
        """``stop_at_layer`` that still fires this hook: ``layer + 1``, or None (run the whole model)."""
        layer = self.layer
        return None if layer is None else layer + 1

    # ---- the activation ---------------------------------------------------------------------------
    def flatten(self, act: Tensor) -> Tensor:
        """[b, pos, ...] → [b, pos, d]: attention ``hook_z`` [b, pos, heads, d_head] gives the head, or all heads
        concatenated. A view where possible, so in-place writes reach ``act``."""
        if act.dim() == 4:
            return act[:, :, self.head] if self.head is not None else act.flatten(2)
        return act

    def unflatten(self, act: Tensor, x: Tensor) -> Tensor:
        """``act`` with its site replaced by ``x`` [b, pos, d] (cast to ``act``'s dtype); ``act`` is not modified."""
        x = x.to(act.dtype)
        if act.dim() == 4:
            if self.head is None:
                return x.reshape(act.shape)
            out = act.clone()
            out[:, :, self.head] = x
            return out
        return x if x.shape == act.shape else x.reshape(act.shape)


def stop_layer_for(names: list[str]) -> int | None:
    """``stop_at_layer`` that still fires every hook in ``names``: one past the last hooked layer, or None
    (run the whole model) when one of them sits after the blocks (``ln_final``, ``unembed``)."""
    stops = [Site(n).stop_layer for n in names]
    return None if any(s is None for s in stops) else max(stops)
