"""ITDA's cross-model similarity (Leask et al. 2025, arXiv 2505.17769): the Jaccard index of two ITDA dictionaries.

An ITDA dictionary's atoms are real activations, so each atom *is* a place in the data: token ``pos`` of
sequence ``seq`` of the token stream the dictionary was built on. Two dictionaries built on the same token
stream (same corpus, tokenizer, context and order) - of two models, or two layers of one model - are
compared by the sets of positions they chose:

    J(A, B) = |A ∩ B| / |A ∪ B|,   A, B ⊂ {(seq, pos)}

(1 for the same choices, 0 for disjoint ones). Which token positions a greedy matching-pursuit dictionary
finds "new" depends only on the geometry of the activations, not on their basis or width, so the index
compares representations of different widths without any alignment.

The builder here runs ITDA's two rules from ``saebench.trainers.itda`` (start from the first batch's most
frequent distinct activations; then add every token that ``k`` steps of signed matching pursuit on the
current dictionary reconstruct with error mean_j (x/‖x‖ − x̂/‖x̂‖)_j² > ``loss_threshold``) over the token
stream *in corpus order*, several hooks from one forward pass, and records each atom's (seq, pos). Each
dictionary is saved as an ``itda`` SAE folder (it loads and encodes like a trained one) plus
``itda_atoms.json`` with the positions and the token stream's fingerprint; comparing dictionaries built on
different token streams is refused (their positions would name different tokens).

    saebench itda-similarity --build OUT --hooks blocks.2.hook_resid_post blocks.5.hook_resid_post --tokens 20000
    saebench itda-similarity OUT/a OUT/b ...      # compare saved dictionaries (e.g. of two models)
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saebench.io import ArtifactError, read_json, write_json

ATOMS_FILE = "itda_atoms.json"


@dataclass
class ITDADictionary:
    """An ITDA dictionary with where each atom came from: ``refs[i] = (seq, pos)`` of atom ``atoms[i]``."""

    hook_name: str
    atoms: Tensor  # [n, d] unit-norm rows
    refs: list[tuple[int, int]]
    token_stream: dict  # fingerprint of the token stream the positions index: sha256, n_sequences, context_size
    model_name: str = ""
    k: int = 0
    loss_threshold: float = 0.0
    stats: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """An ``itda`` SAE folder (SAELens layout + manifest) with ``itda_atoms.json`` next to it."""
        from saebench.site import Site
        from saebench.sae import SAE, SAEConfig

        folder = Path(folder)
        n, d = self.atoms.shape
        sae = SAE(SAEConfig(architecture="itda", d_in=d, d_sae=max(n, 1), model_name=self.model_name, hook_name=self.hook_name,
                            hook_layer=Site.parse(self.hook_name).layer or 0, apply_b_dec_to_input=False, max_iterations=self.k or None, method="itda",
                            metadata={"itda_loss_threshold": self.loss_threshold, "built_by": "saebench.trainers.itda_similarity"}))
        with torch.no_grad():
            sae.W_dec[:n] = self.atoms
            sae.encoder_weight[:n] = self.atoms
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / ATOMS_FILE, {"refs": [list(r) for r in self.refs], "token_stream": self.token_stream, "hook_name": self.hook_name,
                                         "model_name": self.model_name, "k": self.k, "loss_threshold": self.loss_threshold, "stats": self.stats})
        sae.save(folder, extra_files=[ATOMS_FILE])
        return folder


def load_atom_refs(folder: str | Path) -> dict:
    """``itda_atoms.json`` of an ITDA folder built here, checked (positions as a set of (seq, pos) tuples under "ref_set")."""
    path = Path(folder) / ATOMS_FILE
    if not Path(folder).is_dir():
        raise ArtifactError(f"ITDA folder {folder} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {ATOMS_FILE}: only ITDA dictionaries built by `saebench itda-similarity --build` record "
                            "the data position of each atom (an ITDA trained by `saebench train` reads a shuffled stream and has none)")
    raw = read_json(path, "ITDA atom positions")
    refs = raw.get("refs") if isinstance(raw, dict) else None
    if not isinstance(refs, list) or not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) for r in refs):
        raise ArtifactError(f"{path}: 'refs' must be a list of [sequence, position] integer pairs")
    if not isinstance(raw.get("token_stream"), dict):
        raise ArtifactError(f"{path}: 'token_stream' (the fingerprint of the tokens the positions index) is missing")
    n_seed = (raw.get("stats") or {}).get("seed_atoms", 0)
    return raw | {"ref_set": {tuple(r) for r in refs}, "grown_set": {tuple(r) for r in refs[n_seed:]}, "folder": str(folder)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets have no similarity to report (ValueError)."""
    union = len(a | b)
    if union == 0:
        raise ValueError("both dictionaries are empty: the Jaccard index is undefined")
    return len(a & b) / union


def similarity(a: dict | str | Path, b: dict | str | Path, grown_only: bool = False) -> float:
    """Jaccard index of two ITDA dictionaries' atom positions (folders or ``load_atom_refs`` results).

    ``grown_only``: over the atoms added by the matching-pursuit rule only, leaving out the bootstrap (the first
    batch's d_in distinct activations, which with continuous activations are an arbitrary subset of the first
    batch's positions and can dominate a small dictionary). Refuses dictionaries built on different token
    streams: the same (seq, pos) would be a different token."""
    a = a if isinstance(a, dict) else load_atom_refs(a)
    b = b if isinstance(b, dict) else load_atom_refs(b)
    if a["token_stream"] != b["token_stream"]:
        raise ValueError(f"{a.get('folder', 'A')} and {b.get('folder', 'B')} were built on different token streams "
                         f"({a['token_stream']} vs {b['token_stream']}); their atom positions name different tokens. "
                         "Build both with the same --corpus, --context-size, --tokens (and a model with the same tokenizer)")
    key = "grown_set" if grown_only else "ref_set"
    return jaccard(a[key], b[key])


def similarity_matrix(dicts: list[dict], grown_only: bool = False) -> list[list[float]]:
    """Pairwise Jaccard indices (symmetric, 1 on the diagonal of non-empty dictionaries)."""
    return [[similarity(a, b, grown_only) for b in dicts] for a in dicts]


def token_fingerprint(tokens: Tensor) -> dict:
    """What identifies a token stream: sha256 of its ids (int64, row-major) and its shape."""
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    return {"sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(), "n_sequences": int(t.shape[0]), "context_size": int(t.shape[1])}


class _Builder:
    """One hook's dictionary while it grows (ITDA's rules, in stream order)."""

    def __init__(self, hook: str, d: int, capacity: int, k: int, loss_threshold: float):
        self.hook, self.k, self.loss_threshold, self.capacity = hook, k, loss_threshold, capacity
        self.atoms = torch.zeros(capacity, d)
        self.refs = torch.zeros(capacity, 2, dtype=torch.long)
        self.n = 0
        self.n_seed = 0  # atoms from the bootstrap (the first batch's distinct activations)
        self.seen = 0

    def feed(self, x: Tensor, refs: Tensor) -> None:
        """One ITDA batch: ``x`` [B, d] activations, ``refs`` [B, 2] their (seq, pos)."""
        from saebench import sparse
        from saebench.encoders import matching_pursuit
        from saebench.trainers.itda import initial_atom_rows, poorly_reconstructed

        x = x.float()
        self.seen += x.shape[0]
        if self.n == 0:
            first = initial_atom_rows(x, min(x.shape[1], self.capacity))
            self._add(x[first], refs[first])
            self.n_seed = self.n
        if self.n >= self.capacity:
            return
        with torch.no_grad():
            D = self.atoms[: self.n]
            x_hat = sparse.decode(matching_pursuit(x, D, self.k, signed=True), D)
        bad = poorly_reconstructed(x, x_hat, self.loss_threshold).nonzero().squeeze(1)
        self._add(x[bad], refs[bad])

    def _add(self, x: Tensor, refs: Tensor) -> None:
        import torch.nn.functional as F

        take = min(len(x), self.capacity - self.n)
        self.atoms[self.n : self.n + take] = F.normalize(x[:take], dim=-1)
        self.refs[self.n : self.n + take] = refs[:take]
        self.n += take


def build_dictionaries(model, hook_names: list[str], tokens: Tensor, *, d_sae: int = 4096, k: int = 16, loss_threshold: float = 1e-3,
                       batch_tokens: int = 1024, model_batch_size: int = 16, special_ids: Tensor | None = None, model_name: str = "",
                       progress: bool = False) -> dict[str, ITDADictionary]:
    """ITDA dictionaries at ``hook_names`` over ``tokens`` [n_seq, ctx] in order (all hooks from one forward per block).

    Special tokens (``special_ids``) are skipped, like training skips them. ``batch_tokens`` is ITDA's batch:
    a batch's bad tokens are added together after it is encoded with the dictionary as it stood.
    """
    from tqdm.auto import tqdm

    from saebench.activations import token_mask
    from saebench.site import Site, stop_layer_for
    from saebench.models import validate_hook_name

    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [n_seq, context] tensor, got {tuple(tokens.shape)}")
    if not hook_names:
        raise ValueError("give at least one hook")
    for name, v in (("d_sae", d_sae), ("k", k), ("batch_tokens", batch_tokens), ("model_batch_size", model_batch_size)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if not loss_threshold >= 0:
        raise ValueError(f"loss_threshold must be >= 0, got {loss_threshold}")
    sites = [tuple(Site.parse(h)) for h in hook_names]
    for name, _ in sites:
        validate_hook_name(model, name)
    names = {n for n, _ in sites}
    stop = stop_layer_for(list(names))
    device = next(iter(model.parameters())).device
    builders: dict[str, _Builder] = {}
    pending: dict[str, list[Tensor]] = {h: [] for h in hook_names}
    pending_refs: list[Tensor] = []
    ctx = tokens.shape[1]
    t0 = time.perf_counter()

    def flush(final: bool) -> None:
        n_pending = sum(r.shape[0] for r in pending_refs)
        if n_pending == 0:
            return
        refs = torch.cat(pending_refs)
        acts = {h: torch.cat(pending[h]) for h in hook_names}
        n_full = n_pending if final else (n_pending // batch_tokens) * batch_tokens
        for s in range(0, n_full, batch_tokens):
            for h in hook_names:
                if h not in builders:
                    builders[h] = _Builder(h, acts[h].shape[1], d_sae, k, loss_threshold)
                builders[h].feed(acts[h][s : s + batch_tokens], refs[s : s + batch_tokens])
        pending_refs[:] = [refs[n_full:]]
        for h in hook_names:
            pending[h] = [acts[h][n_full:]]

    for s in tqdm(range(0, tokens.shape[0], model_batch_size), desc="itda", disable=not progress):
        rows = tokens[s : s + model_batch_size]
        with torch.no_grad():
            _, cache = model.run_with_cache(rows.to(device), names_filter=lambda n: n in names, stop_at_layer=stop)
        keep = token_mask(rows, special_ids).flatten()
        seq = torch.arange(s, s + rows.shape[0]).repeat_interleave(ctx)
        pos = torch.arange(ctx).repeat(rows.shape[0])
        pending_refs.append(torch.stack([seq, pos], 1)[keep])
        for h, (n, head) in zip(hook_names, sites):
            pending[h].append(Site(n, head).flatten(cache[n]).float().flatten(0, 1).cpu()[keep])
        del cache
        flush(final=False)
    flush(final=True)
    seconds = time.perf_counter() - t0
    fp = token_fingerprint(tokens)
    return {h: ITDADictionary(h, b.atoms[: b.n].clone(), [tuple(map(int, r)) for r in b.refs[: b.n].tolist()], fp, model_name, k, loss_threshold,
                              {"tokens_seen": b.seen, "atoms": b.n, "seed_atoms": b.n_seed, "capacity": d_sae, "seconds_all_hooks": seconds})
            for h, b in builders.items()}


def _folder_name(hook: str) -> str:
    return hook.replace(":", "_h")


def format_matrix(labels: list[str], m: list[list[float]]) -> str:
    w = max(len(s) for s in labels)
    head = " " * w + "  " + "  ".join(f"{i:>6}" for i in range(len(labels)))
    rows = [f"{lab:<{w}}  " + "  ".join(f"{v:6.3f}" for v in row) for lab, row in zip(labels, m)]
    return "\n".join([head, *rows, *(f"  {i}: {lab}" for i, lab in enumerate(labels))])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saebench itda-similarity", description=(
        "Jaccard similarity of ITDA dictionaries (Leask et al. 2025): |A ∩ B| / |A ∪ B| over the (sequence, position) of their atoms.\n"
        "Compare saved dictionaries (FOLDER ...), or build one per --hooks on one token stream into --build OUT and compare them."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="ITDA folders built by --build (with itda_atoms.json).")
    p.add_argument("--build", metavar="OUT", help="Build dictionaries into OUT/<hook>/ (then compare them with any FOLDERs given).")
    p.add_argument("--hooks", nargs="+", default=[], help="Hooks to build dictionaries at (one forward feeds them all).")
    p.add_argument("--model", default="smollm2-135m", help="Model (default: smollm2-135m).")
    p.add_argument("--corpus", default="default", help="Text corpus (default: the offline default corpus).")
    p.add_argument("--tokens", type=int, default=20_000, help="Tokens of the stream to build on (default: 20000).")
    p.add_argument("--context-size", type=int, default=128, help="Tokens per sequence (default: 128).")
    p.add_argument("--d-sae", type=int, default=4096, help="Dictionary capacity (default: 4096).")
    p.add_argument("--k", type=int, default=16, help="Matching-pursuit steps per token (default: 16).")
    p.add_argument("--loss-threshold", type=float, default=1e-3, help="Add a token when mean_j (x/|x| - x^/|x^|)_j^2 exceeds this (default: 1e-3).")
    p.add_argument("--batch-tokens", type=int, default=1024, help="ITDA batch (default: 1024).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="Write the matrix as JSON here.")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    folders = list(args.folders)
    if args.build:
        if not args.hooks:
            raise ValueError("--build needs --hooks")
        from saebench import models, text

        model = models.load_model(args.model, device=args.device)
        toks = text.load_tokens(args.corpus, model.tokenizer, args.context_size, args.tokens, split="train")
        built = build_dictionaries(model, args.hooks, toks, d_sae=args.d_sae, k=args.k, loss_threshold=args.loss_threshold,
                                   batch_tokens=args.batch_tokens, special_ids=text.special_ids(model.tokenizer), model_name=args.model, progress=True)
        for h, d in built.items():
            folders.append(str(d.save(Path(args.build) / _folder_name(h))))
            print(f"{h}: {len(d.refs)} atoms from {d.stats['tokens_seen']} tokens")
    elif args.hooks:
        raise ValueError("--hooks needs --build OUT")
    if len(folders) < 1:
        raise ValueError("give ITDA folders to compare, or --build OUT --hooks ...")
    dicts = [load_atom_refs(f) for f in folders]
    full = [d.get("folder") for d in dicts if (d.get("stats") or {}).get("capacity") and len(d["ref_set"]) >= d["stats"]["capacity"]]
    if full:
        import warnings

        from saebench.config import SaebenchWarning

        warnings.warn(f"{len(full)} dictionar{'y' if len(full) == 1 else 'ies'} reached capacity ({', '.join(full)}): their atoms stop at the "
                      "position where the capacity was hit, so the index also compares how fast they filled; raise --d-sae or "
                      "--loss-threshold (or build on fewer --tokens) for dictionaries that do not fill", SaebenchWarning, stacklevel=2)
    m = similarity_matrix(dicts)
    labels = [f"{d.get('model_name', '')}:{d.get('hook_name', '')}" for d in dicts]
    print("Jaccard index of the atoms' (sequence, position) sets:")
    print(format_matrix(labels, m))
    grown = None
    if all(d["grown_set"] for d in dicts):
        grown = similarity_matrix(dicts, grown_only=True)
        print("\nthe same over the grown atoms only (bootstrap atoms left out):")
        print(format_matrix(labels, grown))
    result = {"folders": folders, "labels": labels, "jaccard": m, "at_capacity": full, "jaccard_grown_only": grown, "atoms": [len(d["ref_set"]) for d in dicts],
              "grown_atoms": [len(d["grown_set"]) for d in dicts],
              "definition": "J(A,B) = |A ∩ B| / |A ∪ B| over atom (sequence, position) pairs"}
    if args.out:
        write_json(Path(args.out), result)
    return result


__all__ = ["ITDADictionary", "build_dictionaries", "jaccard", "load_atom_refs", "main", "similarity", "similarity_matrix", "token_fingerprint"]
