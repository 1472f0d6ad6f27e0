"""saebench: train every modern SAE family on language-model activations, evaluate honestly,
browse and steer features.

Quick start::

    from saebench import TrainConfig, train_and_evaluate, load_sae
    result, metrics = train_and_evaluate(TrainConfig(hook_name="blocks.15.hook_resid_post", training_tokens=200_000))
    sae = load_sae(result.out_dir)
"""

from saebench.config import EvalConfig, TrainConfig
from saebench.sae import SAE, SAEConfig, load_sae
from saebench.sparse import SparseActs


_SOURCES = ("TensorSource", "ArraySource", "ShardFolderSource", "IteratorSource", "as_source")


def __getattr__(name):
    # Heavy imports (transformer_lens) only when the API is actually used.
    if name == "train_and_evaluate":
        from saebench.api import train_and_evaluate

        return train_and_evaluate
    if name == "train_and_evaluate_many":
        from saebench.api import train_and_evaluate_many

        return train_and_evaluate_many
    if name == "evaluate_activations":
        from saebench.evals.core import evaluate_activations

        return evaluate_activations
    if name in _SOURCES:
        from saebench import sources

        return getattr(sources, name)
    if name in ("train", "train_many"):
        from saebench.trainers import loop

        return getattr(loop, name)
    raise AttributeError(name)


__all__ = ["SAE", "SAEConfig", "SparseActs", "TrainConfig", "EvalConfig", "load_sae", "train_and_evaluate", "train_and_evaluate_many", "train",
           "train_many", "evaluate_activations", *_SOURCES]
