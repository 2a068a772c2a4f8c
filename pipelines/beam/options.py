"""PipelineOptions of the cascade job (`qarm pipeline`, `python -m pipelines.jobs.cascade`).

Beam collects the flags of *every* direct PipelineOptions subclass into one parser, so a flag may be defined by
one class only: later jobs (retraining) subclass these classes instead of redefining the flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions

from feature_store.split import add_split_arguments
from pipelines.data import DataSpec
from pipelines.beam.data_flags import add_data_arguments, data_spec_from_args
from pipelines.beam.flags import add_underscore_aliases
from pipelines.encoder.model_io import MODES as ALIGN_MODES


def add_data_flags(parser) -> None:
    """The shared data flags (`pipelines.data.add_data_arguments`), with paths kept as plain strings so the
    options serialise for portable runners (Flink, Spark, Dataflow)."""
    add_data_arguments(parser)
    for action in parser._actions:  # argparse has no public way to retype an added flag
        if action.type is Path:
            action.type = str


def add_cascade_flags(parser) -> None:
    """Every job flag of the cascade (store, encoder, alignment, pairs, quantization), hyphenated; the underscore
    spellings of the previous release are hidden aliases (pipelines.beam.flags)."""
    g = parser.add_argument_group("cascade job")
    g.add_argument("--store", default=None, help="feature-store root the job publishes a version into (required)")
    g.add_argument("--cascade-seed", type=int, default=None,
                   help="seed of pair mining, alignment, the encoder's new layers and quantization (default: "
                        "--seed); the data stays fixed when only this changes")
    g.add_argument("--work-dir", default=None,
                   help="scratch folder for the source snapshot and the unaligned encoder (default: a temp folder; "
                        "on a distributed runner a path every worker can read, e.g. gs://... or a shared mount)")
    g.add_argument("--encoder", default="minilm-effnet", help="named encoder config (pipelines.encoder.config), e.g. "
                                                     "minilm-effnet (real weights) or tiny (tests)")
    g.add_argument("--embed-dim", type=int, default=0, help="item embedding size (0: the encoder config's; QARM: 64)")
    g.add_argument("--encoder-image-size", type=int, default=0, help="encoder input pixels (0: the config's)")
    g.add_argument("--align-mode", choices=ALIGN_MODES, default="side",
                   help="alignment mode: full fine-tuning, VIP5 adapters, or IISAN side network (default)")
    g.add_argument("--align-epochs", type=int, default=6,
                   help="alignment epochs at most (early stopping on the validation pairs, patience 2)")
    g.add_argument("--side-cache-dir", default=None,
                   help="side mode: folder of the frozen MLLM's hidden-state cache, reused by later runs over the "
                        "same items and encoder (default: inside --work-dir)")
    g.add_argument("--side-layer-stride", type=int, default=2,
                   help="side mode: keep every k-th backbone layer (IISAN group layer-dropping)")
    g.add_argument("--side-cache-shard-size", type=int, default=4096,
                   help="side mode: items per hidden-state cache shard (one worker runs the frozen MLLM over one "
                        "shard; a shard is ~19.5 KB x this for minilm-effnet)")
    g.add_argument("--side-dropout", type=float, default=0.1,
                   help="side mode: dropout inside the side network's blocks while training")
    g.add_argument("--unaligned-map", choices=("auto", "pca", "gaussian"), default="auto",
                   help="map of the frozen MLLM's pooled state to the item embedding (the unaligned embedding, "
                        "where alignment starts): pca of the protocol's train-portion items (side mode; auto's "
                        "choice there) or a seeded gaussian projection (auto's choice in the other modes); a warm "
                        "start (--init-encoder) keeps its checkpoint's")
    g.add_argument("--align-gate-z", type=float, default=None,
                   help="never-worse gate: an epoch replaces step 0 (the unaligned embedding) only when its "
                        "validation-window next-item recall@10 gain minus this many paired standard errors is "
                        "above 0 (default: the trainer's, 1.645; 0 accepts any gain)")
    g.add_argument("--align-batch-size", type=int, default=128, help="pairs per contrastive batch")
    g.add_argument("--align-lr", type=float, default=None, help="alignment learning rate (default: the mode's)")
    g.add_argument("--align-temperature", type=float, default=None, help="InfoNCE temperature (default: trainer's)")
    g.add_argument("--align-nproc", type=int, default=1,
                   help="alignment trainer processes on the align worker (data-parallel: DDP over gloo on CPU, "
                        "nccl on GPU, in-batch negatives gathered across them; --align-batch-size is the global "
                        "batch); 1 trains in the worker")
    g.add_argument("--align-checkpoint", default=None,
                   help="reuse this aligned encoder checkpoint instead of training (skips the align stage)")
    g.add_argument("--init-encoder", default=None,
                   help="warm-start alignment from this encoder checkpoint (the retraining job passes the "
                        "previous version's encoder/)")
    g.add_argument("--init-quantizer", default=None,
                   help="warm-start RQ codebooks from this saved quantizer (previous version's quantizer/)")
    g.add_argument("--swing-top-n", type=int, default=20, help="Swing partners kept per item")
    g.add_argument("--swing-alpha", type=float, default=1.0, help="Swing smoothing alpha")
    g.add_argument("--min-support", type=int, default=2, help="minimum co-occurring users of a pair")
    g.add_argument("--trigger-history", type=int, default=50, help="previous positives searched for a trigger")
    g.add_argument("--trigger-similarity", choices=("collab", "swing"), default="collab",
                   help="similarity that picks each target's trigger among the user's last positives: the item "
                        "vectors of a collaborative model fitted on the train portion (collab, QARM's choice) or "
                        "Swing neighbours; targets it cannot score fall back to the pre-trained encoder")
    g.add_argument("--trigger-fallback", choices=("encoder", "none"), default="encoder",
                   help="fallback similarity for targets the trigger similarity cannot score (encoder: the "
                        "unaligned encoder's vectors; needs the unaligned embeddings, so none with --skip-unaligned)")
    g.add_argument("--swing-max-users", type=int, default=1000,
                   help="users per item Swing sees (a fixed-seed sample above it): bounds one item's cost")
    g.add_argument("--swing-max-history", type=int, default=200,
                   help="most recent positives per user Swing sees: bounds one user's fan-out")
    g.add_argument("--collab-dim", type=int, default=32, help="factor size of the collaborative model (iALS)")
    g.add_argument("--collab-iterations", type=int, default=4, help="ALS sweeps of the collaborative model")
    g.add_argument("--collab-reg", type=float, default=0.1, help="L2 regularisation of the collaborative model")
    g.add_argument("--collab-alpha", type=float, default=10.0, help="confidence 1 + alpha of an observed positive")
    g.add_argument("--collab-min-count", type=int, default=2,
                   help="items with fewer train positives get no collaborative vector (fallback for them)")
    g.add_argument("--heldout-frac", type=float, default=0.1,
                   help="latest share of the *train portion's* positives whose pairs validate alignment (early "
                        "stopping, defaults); the protocol's valid / test windows never reach pair mining")
    g.add_argument("--rq-levels", type=int, default=3, help="RQ levels")
    g.add_argument("--rq-codebook-size", type=int, default=0, help="centroids per RQ level (0: auto ~sqrt(N))")
    g.add_argument("--fit-sample", type=int, default=100_000, help="items the RQ codebooks are fitted on")
    g.add_argument("--vq-k", type=int, default=25, help="neighbours in the VQ code (QARM: 25)")
    g.add_argument("--vq-index", choices=("flat", "ivf"), default="flat", help="faiss index for the VQ k-NN")
    g.add_argument("--vq-gather-max", type=int, default=200_000,
                   help="largest catalog whose VQ base is gathered into each worker (exact k-NN); above it the "
                        "k-NN is a distributed IVF search (coarse centroids fitted on --fit-sample items)")
    g.add_argument("--vq-nlist", type=int, default=0, help="IVF lists of the distributed k-NN (0: ~4 sqrt(N))")
    g.add_argument("--vq-nprobe", type=int, default=16, help="IVF lists each query searches (distributed k-NN)")
    g.add_argument("--embed-batch-size", type=int, default=64, help="items per RunInference batch")
    g.add_argument("--torch-threads", type=int, default=2, help="torch threads per worker")
    g.add_argument("--align-min-ram", default=None,
                   help="resource hint for the single align worker, e.g. 16GB (runners that honour hints: Dataflow)")
    g.add_argument("--align-accelerator", default=None,
                   help="accelerator hint for the align step, e.g. 'type:nvidia-tesla-t4;count:1;install-nvidia-driver'")
    g.add_argument("--read-sources", choices=("auto", "workers", "driver"), default="auto",
                   help="where the source is read and parsed: auto (default) reads the generic Parquet / CSV source "
                        "on the workers and generates / loads presets (synthetic, movielens) in the driver; driver "
                        "loads any source in the driver and snapshots it for the job")
    g.add_argument("--skip-unaligned", action="store_true",
                   help="do not embed/quantize with the unaligned encoder (no *_unaligned tables; ablation row f "
                        "and the aligned-vs-unaligned recall need them)")
    from pipelines.beam.user_prompt_stage import add_user_prompt_flags; add_user_prompt_flags(parser)


class DataOptions(PipelineOptions):
    """The shared data-source flags (--dataset --data ... --seed)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_data_flags(parser)
        add_underscore_aliases(parser)


class CascadeOptions(PipelineOptions):
    """Job flags of the cascade (see `add_cascade_flags`) and the protocol's split flags."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_cascade_flags(parser)
        add_split_arguments(parser)
        add_underscore_aliases(parser)


def data_spec(options: PipelineOptions) -> DataSpec:
    """The job's DataSpec, built through `data_spec_from_args` so no data flag is ever dropped."""
    return data_spec_from_args(options.view_as(DataOptions))


def cli_parser_flags(parser: argparse.ArgumentParser) -> None:
    """`qarm pipeline` flags: the same definitions as the PipelineOptions classes."""
    add_data_flags(parser)
    add_cascade_flags(parser)
    add_split_arguments(parser)


def cascade_seed(options: PipelineOptions) -> int:
    """The seed of every seeded cascade stage: --cascade-seed, else the data --seed."""
    seed = options.view_as(CascadeOptions).cascade_seed
    return int(data_spec(options).seed if seed is None else seed)
