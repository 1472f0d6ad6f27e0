"""A tiny, deterministic browse root for the dashboard, app and browser tests (not a test module).

Layout built by :func:`build_root`::

    root/corpus.txt            eval-split paragraphs (some with <script>/<b> tags in them)
    root/saes/topk/            TopK SAE (96 latents, latent 5 dead) + dashboards + eval_core.json
    root/saes/topk_perm/       the same SAE with its latents permuted (PERM) + dashboards: latent i of
                               topk is latent PERM_INV[i] here (decoder cosine 1, co-activation r = 1)
    root/saes/abstopk/         signed AbsTopK SAE (48 latents) + dashboards + eval_core.json
    root/saes/nodash/          an SAE without dashboards
    root/bench/results.json    bench-style results records
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from saebench.sae import SAE, SAEConfig
from saebench.text import is_eval_document

HOOK = "blocks.0.hook_resid_post"
CTX = 32
N_TOKENS = 2048
DEAD = 5
PLANTED = 7  # a TopK latent aimed at the token " fox"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "a", "curious", "cat", "watches", "from", "old", "wooden", "fence", "and", "birds", "sing", "in", "tall", "green", "trees", "near", "quiet", "river", "bank"]
SCRIPT = "<script>alert('x')</script>"
PERM = torch.randperm(96, generator=torch.Generator().manual_seed(7))  # topk_perm latent j = topk latent PERM[j]
PERM_INV = torch.argsort(PERM)  # topk latent i = topk_perm latent PERM_INV[i]


def write_corpus(path: Path, n_docs: int = 260) -> Path:
    """Paragraphs that all fall in the held-out eval split, every 5th with an HTML/script tag."""
    rng = random.Random(0)
    docs, i = [], 0
    while len(docs) < n_docs:
        d = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."
        if i % 5 == 0:
            d = f"{SCRIPT} {d} <b>bold</b>"
        i += 1
        if is_eval_document(d):
            docs.append(d)
    path.write_text("\n\n".join(docs))
    return path


def make_sae(arch: str, d_sae: int, k: int, model_dir: Path, corpus: Path, seed: int, model=None) -> SAE:
    cfg = SAEConfig(architecture=arch, d_in=64, d_sae=d_sae, k=k, model_name=str(model_dir), hook_name=HOOK, hook_layer=0,
                    context_size=CTX, method=arch, metadata={"corpus": str(corpus)})
    sae = SAE(cfg)
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if arch == "topk":
            sae.b_enc[DEAD] = -1e4  # never among the top k: a dead latent
            if model is not None:
                fox = model.to_tokens(" fox", prepend_bos=False)[0, 0]
                _, cache = model.run_with_cache(torch.tensor([[1, int(fox)]]), names_filter=lambda n: n == HOOK, stop_at_layer=1)
                v = cache[HOOK][0, 1].float()
                sae.encoder_weight[PLANTED] = 3 * v / v.norm()
    return sae


def build_root(root: Path, model_dir: Path, model) -> Path:
    """Create the browse root (dashboards included) under ``root``; returns ``root``."""
    from saebench.dashboards import build_dashboards

    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt")
    for name, arch, d_sae, k, seed in (("topk", "topk", 96, 6, 0), ("abstopk", "abstopk", 48, 4, 1), ("nodash", "topk", 32, 4, 2)):
        sae = make_sae(arch, d_sae, k, model_dir, corpus, seed, model)
        folder = sae.save(root / "saes" / name)
        if name != "nodash":
            build_dashboards(folder, model=model, n_tokens=N_TOKENS, feature_batch_size=32, progress=False)
            (folder / "eval_core.json").write_text(json.dumps({
                "l0": float(k), "fvu": 0.3 + 0.1 * seed, "ce_loss_score": 0.8 - 0.1 * seed, "kl_div_score": 0.7,
                "dead_fraction": 1 / d_sae, "n_tokens": 1000, "architecture": arch, "method": arch, "d_sae": d_sae}))
    topk = SAE.load(root / "saes" / "topk")
    perm = SAE(topk.cfg)
    with torch.no_grad():
        perm.encoder_weight.copy_(topk.encoder_weight[PERM])
        perm.W_dec.copy_(topk.W_dec[PERM])
        perm.b_enc.copy_(topk.b_enc[PERM])
        perm.b_dec.copy_(topk.b_dec)
    folder = perm.save(root / "saes" / "topk_perm")
    build_dashboards(folder, model=model, n_tokens=N_TOKENS, feature_batch_size=32, progress=False)
    bench = root / "bench"
    bench.mkdir(exist_ok=True)
    (bench / "results.json").write_text(json.dumps({"results": [
        {"name": "bench-a", "method": "batchtopk", "l0": 12.0, "fvu": 0.25, "ce_loss_score": 0.9},
        {"name": "bench-b", "method": "jumprelu", "l0": 20.0, "fvu": 0.2, "ce_loss_score": 0.93},
    ]}))
    return root


APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")


def open_app(monkeypatch, root: Path, **params):
    """The Streamlit app under ``AppTest`` on browse root ``root``, opened with these query parameters, run once, no exception."""
    from saebench.app import launch
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(launch.APP_ROOT_ENV, str(root))
    monkeypatch.delenv(launch.APP_MODEL_ENV, raising=False)
    at = AppTest.from_file(APP, default_timeout=90)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def html(at) -> str:
    """Every HTML block the app rendered, joined."""
    return "\n".join(h.proto.body for h in at.html)
