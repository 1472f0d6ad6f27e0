"""Feature dashboards: one precompute pass over held-out tokens, stored for fast queries.

``build_dashboards(sae_dir)`` harvests and encodes a token set once, keeping only the sparse codes
(token, latent, value) of non-special positions, then walks the latents in feature batches and
stores, per latent: the top activating examples (and, for signed SAEs, the most negative ones),
random samples from equal-width activation intervals, density and a histogram of non-zero values,
top ± logit effects (``W_dec · W_U``) with their histogram, nearest latents by decoder cosine and
by activation (Pearson) correlation, and dead/dense flags.

Layout of ``SAE_DIR/dashboards/``:

- ``features.sqlite``: tables ``meta`` (provenance, JSON values), ``vocab``, ``features`` (one row
  per latent), ``examples`` (window of token values around each example), ``feature_tokens`` (the
  token at each top example's peak, for search by token), ``batches`` (finished feature batches)
  and ``examples_fts`` (FTS5 over top-example text);
- ``tokens.npy``: the token set ``[n_seq, context_size]`` (int32) the examples point into;
- ``feature_stats.npz``: ``density``, ``max_act``, ``min_act``, ``n_active`` per latent, for
  whole-SAE views without touching SQLite;
- ``labels.sqlite``: user labels/explanations with FTS5; never touched by a rebuild;
- ``codes.safetensors``: the harvested sparse codes while a build is unfinished (for resume).

Every feature batch is written in one SQLite transaction together with its row in ``batches``, so
a killed build resumes at the first unfinished batch and produces the same database.

The package, by job:

- :mod:`~saebench.dashboards.config`: ``DashboardConfig`` and the file names above;
- :mod:`~saebench.dashboards.build`: the precompute (``build_dashboards``, ``harvest_codes``);
- :mod:`~saebench.dashboards.store`: the SQLite schema, bounded searches and the query layer the app
  reads (``Dashboard``, ``FeatureData``, ``Example``, ...), and ``max_abs_activation`` for steering;
- :mod:`~saebench.dashboards.prompt`: live activations on a user's prompt;
- :mod:`~saebench.dashboards.compare`: comparing latents across SAEs on the same hook.

Finding SAE folders lives in :mod:`saebench.folders` (re-exported here), reading eval results in
:mod:`saebench.evals.results` and launching the browser in :mod:`saebench.app.launch`.
"""

from saebench.dashboards.build import build_dashboards, harvest_codes
from saebench.dashboards.compare import TokenCodes, cosine_matches, decoder_directions, same_site, same_tokens
from saebench.dashboards.config import (
    CODES_FILE,
    DASHBOARD_DIR,
    DB_FILE,
    FORMAT_VERSION,
    LABELS_FILE,
    STATS_FILE,
    TOKEN_CODES_FILE,
    TOKENS_FILE,
    DashboardConfig,
    build_command,
    dashboard_dir,
)
from saebench.dashboards.prompt import PROMPT_MAX_TOKENS, PromptActs, prompt_activations, top_latents_per_token
from saebench.dashboards.store import (
    MAX_QUERY_CHARS,
    MAX_QUERY_WORDS,
    SEARCH_SLOTS,
    Dashboard,
    DashboardMax,
    Example,
    FeatureData,
    SearchBusy,
    SearchPage,
    TextHit,
    TokenHit,
    mark_words,
    max_abs_activation,
    query_words,
    word_tokens,
)
from saebench.folders import SaeEntry, SkippedSae, find_saes, resolve_sae, scan_saes

__all__ = [
    "CODES_FILE",
    "DASHBOARD_DIR",
    "DB_FILE",
    "FORMAT_VERSION",
    "LABELS_FILE",
    "MAX_QUERY_CHARS",
    "MAX_QUERY_WORDS",
    "PROMPT_MAX_TOKENS",
    "SEARCH_SLOTS",
    "STATS_FILE",
    "TOKENS_FILE",
    "TOKEN_CODES_FILE",
    "Dashboard",
    "DashboardConfig",
    "DashboardMax",
    "Example",
    "FeatureData",
    "PromptActs",
    "SaeEntry",
    "SearchBusy",
    "SearchPage",
    "SkippedSae",
    "TextHit",
    "TokenCodes",
    "TokenHit",
    "build_command",
    "build_dashboards",
    "cosine_matches",
    "dashboard_dir",
    "decoder_directions",
    "find_saes",
    "harvest_codes",
    "mark_words",
    "max_abs_activation",
    "prompt_activations",
    "query_words",
    "resolve_sae",
    "same_site",
    "same_tokens",
    "scan_saes",
    "top_latents_per_token",
    "word_tokens",
]
