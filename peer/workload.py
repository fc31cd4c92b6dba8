"""What a run trains, built once from its settings: tokenizer, model config and initial model, token corpus,
held-out batches and the run fingerprint. The peer, the simulation and the experiments all start here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from peer.config import RunConfig, fingerprint, fingerprint_settings
from peer.data import Corpus, Tokenizer, load_corpus, open_corpus
from peer.model import architecture, build_model, load_model_config, load_pretrained
from peer.outer import tensors_sha256

if TYPE_CHECKING:
    from transformers import PretrainedConfig  # only peer.model imports transformers at run time


@dataclass(frozen=True)
class Workload:
    """The model and data of a run, identical on every peer with the same settings."""

    tokenizer: Tokenizer
    model_config: PretrainedConfig
    model: torch.nn.Module
    """The initial model, fp32 on the CPU: the same weights on every peer (from the seed, or --init-from)."""
    corpus: Corpus
    held_out: list[torch.Tensor]
    """Fixed held-out batches (batch, seq_len), the same on every peer."""
    settings: dict
    """The settings that must match for peers to average together (peer.config.fingerprint_settings)."""
    fingerprint: str
    tokens_per_step: int
    """Tokens in one inner step of one peer (batch size x sequence length)."""


def build_workload(
    config: RunConfig,
    *,
    eval_batch_size: int | None = None,
    num_eval_batches: int | None = None,
    in_memory: bool = False,
) -> Workload:
    """Tokenizer, model, corpus, held-out batches and fingerprint for `config`.

    The held-out batches are `num_eval_batches` (default --eval-batches) batches of `eval_batch_size`
    (default --batch-size) windows; the experiments use larger batches of the same windows. Sets torch's
    CPU threads if --num-threads asks for it (before anything runs on them). `in_memory` reads the corpus into one
    token tensor (`corpus.train`, for the simulation and experiments; local datasets only)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tokenizer = Tokenizer(config.data.tokenizer)
    pretrained = config.model.init_from
    model_config = load_model_config(
        config.model.name,
        vocab_size=tokenizer.vocab_size,
        max_seq_len=config.data.seq_len,
        pretrained=pretrained is not None,
    )
    if pretrained is None:
        model, init_params_sha256 = build_model(model_config, seed=config.seed), None
    else:
        model = load_pretrained(pretrained, model_config)
        init_params_sha256 = tensors_sha256(list(model.parameters()))
    # the simulation samples windows of one in-memory token tensor (TokenCorpus); a peer streams any dataset
    corpus = load_corpus(config.data, tokenizer) if in_memory else open_corpus(config.data, tokenizer)
    held_out = corpus.eval_batches(
        batch_size=eval_batch_size or config.data.batch_size,
        seq_len=config.data.seq_len,
        num_batches=config.eval_batches if num_eval_batches is None else num_eval_batches,
    )
    settings = fingerprint_settings(
        config,
        model_arch=architecture(model_config),
        tokenizer_id=tokenizer.id,
        init_params_sha256=init_params_sha256,
    )
    return Workload(
        tokenizer=tokenizer,
        model_config=model_config,
        model=model,
        corpus=corpus,
        held_out=held_out,
        settings=settings,
        fingerprint=fingerprint(settings),
        tokens_per_step=config.data.batch_size * config.data.seq_len,
    )
