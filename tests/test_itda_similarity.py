"""ITDA's Jaccard similarity of dictionaries (issue #18.6): planted sets, the builder's atom positions, the CLI."""

import pytest
import torch
import torch.nn.functional as F

from saebench.io import ArtifactError
from saebench.trainers.itda_similarity import (
    ITDADictionary,
    _Builder,
    build_dictionaries,
    jaccard,
    load_atom_refs,
    main,
    similarity,
    similarity_matrix,
    token_fingerprint,
)
from saebench.sae import load_sae

STREAM = {"sha256": "0" * 64, "n_sequences": 4, "context_size": 8}


def saved(tmp_path, name, refs, stream=STREAM, d=6):
    atoms = F.normalize(torch.randn(len(refs), d, generator=torch.Generator().manual_seed(len(refs))), dim=-1)
    return ITDADictionary("blocks.0.hook_resid_post", atoms, refs, stream, "m", k=2, loss_threshold=1e-3).save(tmp_path / name)


def test_jaccard_of_planted_dictionaries_identical_disjoint_and_partial(tmp_path):
    a = saved(tmp_path, "a", [(0, 1), (0, 5), (1, 2), (3, 7)])
    same = saved(tmp_path, "same", [(3, 7), (1, 2), (0, 5), (0, 1)])  # the same set in another order
    disjoint = saved(tmp_path, "disjoint", [(0, 2), (2, 2), (3, 6)])
    partial = saved(tmp_path, "partial", [(0, 1), (1, 2), (2, 0), (2, 1), (3, 0), (3, 6)])
    assert similarity(a, same) == 1.0
    assert similarity(a, disjoint) == 0.0
    # by hand: A ∩ P = {(0,1), (1,2)}, |A ∪ P| = 4 + 6 - 2 = 8; D ∩ P = {(3,6)}, |D ∪ P| = 3 + 6 - 1 = 8
    assert similarity(a, partial) == 2 / 8
    m = similarity_matrix([load_atom_refs(p) for p in (a, disjoint, partial)])
    assert m == [[1.0, 0.0, 2 / 8], [0.0, 1.0, 1 / 8], [2 / 8, 1 / 8, 1.0]]
    assert load_sae(a).cfg.architecture == "itda" and load_sae(a).d_sae == 4  # the folder is an ITDA SAE too


def test_refuses_dictionaries_of_different_token_streams_and_folders_without_positions(tmp_path):
    a = saved(tmp_path, "a", [(0, 1)])
    b = saved(tmp_path, "b", [(0, 1)], stream=STREAM | {"sha256": "1" * 64})
    with pytest.raises(ValueError, match="different token streams"):
        similarity(a, b)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="itda_atoms.json"):
        load_atom_refs(tmp_path / "plain")
    with pytest.raises(ValueError, match="undefined"):
        jaccard(set(), set())
    with pytest.raises(ArtifactError, match="does not exist"):
        load_atom_refs(tmp_path / "missing")


def test_builder_applies_itda_rules_in_stream_order_and_records_first_positions():
    e = torch.eye(5)
    b = _Builder("h", d=5, capacity=10, k=1, loss_threshold=1e-3)
    # batch 1: e0 twice, e1 once -> starts from its distinct rows, most frequent first, each at its first position
    b.feed(torch.stack([e[1], 2 * e[0], 2 * e[0]]), torch.tensor([[0, 0], [0, 1], [0, 2]]))
    assert b.n == b.n_seed == 2 and b.refs[:2].tolist() == [[0, 1], [0, 0]]
    # batch 2: e1 is explained (1 MP step), e2 (twice) and e3 are not: all three are added, in batch order
    b.feed(torch.stack([3 * e[1], e[2], e[2], -e[3]]), torch.tensor([[1, 0], [1, 1], [1, 2], [1, 3]]))
    assert b.n == 5 and b.refs[2:5].tolist() == [[1, 1], [1, 2], [1, 3]]
    assert torch.equal(b.atoms[4], -e[3])  # atoms are the normalised activations, signs kept
    # capacity: only the first `room` bad tokens enter
    small = _Builder("h", d=5, capacity=3, k=1, loss_threshold=1e-3)
    small.feed(torch.stack([e[0], e[1]]), torch.tensor([[0, 0], [0, 1]]))
    small.feed(torch.stack([e[2], e[3], e[4]]), torch.tensor([[1, 0], [1, 1], [1, 2]]))
    assert small.n == 3 and small.refs.tolist()[-1] == [1, 0]


def test_built_dictionaries_point_at_the_activations_they_hold(tiny_model, tmp_path):
    from saebench.text import special_ids

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 5000, (12, 16), generator=g)
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    built = build_dictionaries(tiny_model, hooks, tokens, d_sae=120, k=4, loss_threshold=1e-3, batch_tokens=40, model_batch_size=5,
                               special_ids=special_ids(tiny_model.tokenizer), model_name="tiny")
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    for h, d in built.items():
        assert 64 < len(d.refs) <= 120 and len(set(d.refs)) == len(d.refs)
        assert all(pos != 0 for _, pos in d.refs)  # BOS is skipped, like training skips it
        want = F.normalize(torch.stack([cache[h][s, p] for s, p in d.refs]).float(), dim=-1)
        torch.testing.assert_close(d.atoms, want, atol=1e-5, rtol=1e-5)
        assert d.token_stream == token_fingerprint(tokens)
    # building again is deterministic (J = 1); two layers compare by their position sets
    again = build_dictionaries(tiny_model, hooks[:1], tokens, d_sae=120, k=4, batch_tokens=40, model_batch_size=3,
                               special_ids=special_ids(tiny_model.tokenizer))
    assert set(again[hooks[0]].refs) == set(built[hooks[0]].refs)
    a, b = (built[h].save(tmp_path / str(i)) for i, h in enumerate(hooks))
    sa, sb = set(built[hooks[0]].refs), set(built[hooks[1]].refs)
    assert similarity(a, b) == len(sa & sb) / len(sa | sb)


def test_cli_builds_and_compares(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "itda"
    res = main(["--build", str(out), "--model", str(tiny_model_dir), "--corpus", str(text_file), "--hooks", "blocks.0.hook_resid_post",
                "blocks.1.hook_resid_post", "--tokens", "600", "--context-size", "32", "--d-sae", "1024", "--k", "4", "--batch-tokens", "64",
                "--out", str(tmp_path / "m.json")])
    assert len(res["jaccard"]) == 2 and res["jaccard"][0][0] == 1.0 and res["jaccard"][0][1] == res["jaccard"][1][0]
    # the grown-only index leaves the bootstrap out: by hand from the saved positions
    a, b = (load_atom_refs(f) for f in res["folders"])
    assert a["grown_set"] == set(map(tuple, a["refs"][a["stats"]["seed_atoms"]:])) and len(a["grown_set"]) < len(a["ref_set"])
    if res["jaccard_grown_only"] is not None:
        assert res["jaccard_grown_only"][0][1] == len(a["grown_set"] & b["grown_set"]) / len(a["grown_set"] | b["grown_set"])
    assert (tmp_path / "m.json").is_file() and "blocks.1.hook_resid_post" in capsys.readouterr().out
    assert res["at_capacity"] == []  # ~560 tokens cannot fill 1,024 atoms
    again = main([str(out / "blocks.0.hook_resid_post"), str(out / "blocks.0.hook_resid_post")])
    assert again["jaccard"] == [[1.0, 1.0], [1.0, 1.0]]


def test_cli_warns_when_a_dictionary_is_full(tmp_path):
    from saebench.config import SaebenchWarning

    d = ITDADictionary("h", F.normalize(torch.randn(3, 4), dim=-1), [(0, 1), (0, 2), (1, 1)], STREAM, k=2, stats={"capacity": 3, "seed_atoms": 1})
    d.save(tmp_path / "full")
    with pytest.warns(SaebenchWarning, match="reached capacity"):
        res = main([str(tmp_path / "full")])
    assert res["at_capacity"] == [str(tmp_path / "full")]
