"""The one hook-site type: parsing, layer, stop layer, flatten/unflatten (saebench/site.py).

The table holds the hook names the rest of the suite uses; the expected values are what the four layer
computations it replaced returned (activations.hook_layer_of, models.hook_layer, sae._layer_of,
steering.stop_layer / activations.stop_layer_for), so their edge cases are pinned here.
"""

from __future__ import annotations

import pytest
import torch

from saebench import models
from saebench.activations import stop_layer_for
from saebench.sae import _layer_of
from saebench.site import Site

# spec, hook, head, block, layer, stop_layer
TABLE = [
    ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre", None, 0, 0, 1),
    ("blocks.1.hook_resid_post", "blocks.1.hook_resid_post", None, 1, 1, 2),
    ("blocks.12.hook_resid_mid", "blocks.12.hook_resid_mid", None, 12, 12, 13),
    ("blocks.0.hook_mlp_out", "blocks.0.hook_mlp_out", None, 0, 0, 1),
    ("blocks.3.mlp.hook_out", "blocks.3.mlp.hook_out", None, 3, 3, 4),
    ("blocks.1.attn.hook_z", "blocks.1.attn.hook_z", None, 1, 1, 2),
    ("blocks.1.attn.hook_z:3", "blocks.1.attn.hook_z", 3, 1, 1, 2),
    ("blocks.0.attn.hook_z:0", "blocks.0.attn.hook_z", 0, 0, 0, 1),
    ("hook_embed", "hook_embed", None, None, 0, 1),
    ("hook_pos_embed", "hook_pos_embed", None, None, 0, 1),
    ("embed.hook_out", "embed.hook_out", None, None, 0, 1),
    ("ln_final.hook_normalized", "ln_final.hook_normalized", None, None, None, None),
    ("unembed.hook_out", "unembed.hook_out", None, None, None, None),
    ("blocks.x.hook_resid_post", "blocks.x.hook_resid_post", None, None, None, None),  # not a block index: unknown
    ("no_such_hook", "no_such_hook", None, None, None, None),
]


@pytest.mark.parametrize(("spec", "hook", "head", "block", "layer", "stop"), TABLE, ids=[t[0] for t in TABLE])
def test_site_table(spec, hook, head, block, layer, stop):
    s = Site.parse(spec)
    assert (s.hook, s.head) == (hook, head)
    assert tuple(s) == (hook, head)  # unpacks as (hook, head), as the old tuples did
    assert str(s) == spec
    assert (s.block, s.layer, s.stop_layer) == (block, layer, stop)
    # the functions the table replaced, now all on Site
    assert stop_layer_for([hook]) == stop
    assert _layer_of(hook, None) == (-1 if block is None else block)
    assert _layer_of(hook, 7) == 7  # a SAELens cfg's own hook_layer wins
    if block is None:
        with pytest.raises(models.HookNameError, match="not inside a block"):
            models.hook_layer(hook)
    else:
        assert models.hook_layer(hook) == block


def test_stop_layer_for_several_hooks_is_one_past_the_last():
    assert stop_layer_for(["blocks.3.hook_resid_post", "blocks.0.hook_mlp_out"]) == 4
    assert stop_layer_for(["hook_embed", "blocks.2.hook_resid_pre"]) == 3
    assert stop_layer_for(["blocks.3.hook_resid_post", "ln_final.hook_normalized"]) is None  # one hook after the blocks: run it all


@pytest.mark.parametrize("spec", ["", "blocks.0.attn.hook_z:x", "blocks.0.attn.hook_z:", "blocks.0.attn.hook_z:-1"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="hook name is needed|must be a head index"):
        Site.parse(spec)


def test_head_from_the_name_wins_over_the_given_one():
    assert Site.parse("blocks.1.attn.hook_z:2", head=5) == ("blocks.1.attn.hook_z", 2)
    assert Site.parse("blocks.1.attn.hook_z", head=5) == ("blocks.1.attn.hook_z", 5)


def test_of_sae_reads_the_cfg():
    from types import SimpleNamespace as NS

    assert Site.of_sae(NS(cfg=NS(hook_name="blocks.2.attn.hook_z", hook_head_index=4))) == ("blocks.2.attn.hook_z", 4)
    assert Site.of_sae(NS(cfg=NS(hook_name="blocks.2.attn.hook_z:1", hook_head_index=4))) == ("blocks.2.attn.hook_z", 1)
    with pytest.raises(ValueError, match="no hook_name"):
        Site.of_sae(NS(cfg=NS(hook_name="", hook_head_index=None)))


def test_flatten_and_unflatten():
    z = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).view(2, 3, 4, 5)  # [b, pos, heads, d_head]
    one, every = Site("blocks.0.attn.hook_z", 2), Site("blocks.0.attn.hook_z")
    assert torch.equal(one.flatten(z), z[:, :, 2])
    assert torch.equal(every.flatten(z), z.reshape(2, 3, 20))
    # a view: writes through (the e2e splice relies on it)
    one.flatten(z)[0, 0, 0] = -1.0
    assert z[0, 0, 2, 0] == -1.0
    x = torch.full((2, 3, 5), 7.0)
    out = one.unflatten(z, x.float())
    assert out.dtype == z.dtype and torch.equal(out[:, :, 2], x.double()) and torch.equal(out[:, :, 1], z[:, :, 1])
    assert z[0, 0, 2, 0] == -1.0  # unflatten never writes into its input
    assert torch.equal(every.unflatten(z, every.flatten(z) + 1), z + 1)
    resid = torch.randn(2, 3, 6)
    res = Site("blocks.0.hook_resid_post")
    assert res.flatten(resid) is resid
    assert torch.equal(res.unflatten(resid, resid * 2), resid * 2)
