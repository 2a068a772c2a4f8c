"""PipelineOptions of the cascade job (`qarm pipeline`, `python -m pipelines.cascade`).

Beam collects the flags of *every* direct PipelineOptions subclass into one parser, so a flag may be defined by
one class only: later jobs (retraining) subclass these classes instead of redefining the flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.data import DataSpec, add_data_arguments, data_spec_from_args


def add_data_flags(parser) -> None:
    """The shared data flags (`pipelines.data.add_data_arguments`), with paths kept as plain strings so the
    options serialise for portable runners (Flink, Spark, Dataflow)."""
    add_data_arguments(parser)
    for action in parser._actions:  # argparse has no public way to retype an added flag
        if action.type is Path:
            action.type = str


def add_cascade_flags(parser) -> None:
    """Every job flag of the cascade (store, encoder, alignment, pairs, quantization)."""
    g = parser.add_argument_group("cascade job")
    g.add_argument("--store", default=None, help="feature-store root the job publishes a version into (required)")
    g.add_argument("--work_dir", default=None,
                   help="scratch folder for the source snapshot and the unaligned encoder (default: a temp folder; "
                        "on a distributed runner a path every worker can read, e.g. gs://... or a shared mount)")
    g.add_argument("--encoder", default="minilm-effnet", help="named encoder config (pipelines.mllm.config), e.g. "
                                                     "minilm-effnet (real weights) or tiny (tests)")
    g.add_argument("--embed_dim", type=int, default=0, help="item embedding size (0: the encoder config's; QARM: 64)")
    g.add_argument("--encoder_image_size", type=int, default=0, help="encoder input pixels (0: the config's)")
    g.add_argument("--align_mode", choices=("full", "adapters", "side"), default="side",
                   help="alignment mode: full fine-tuning, VIP5 adapters, or IISAN side network (default)")
    g.add_argument("--align_epochs", type=int, default=2, help="alignment epochs")
    g.add_argument("--align_batch_size", type=int, default=128, help="pairs per contrastive batch")
    g.add_argument("--align_lr", type=float, default=None, help="alignment learning rate (default: the mode's)")
    g.add_argument("--align_temperature", type=float, default=None, help="InfoNCE temperature (default: trainer's)")
    g.add_argument("--align_checkpoint", default=None,
                   help="reuse this aligned encoder checkpoint instead of training (skips the align stage)")
    g.add_argument("--init_encoder", default=None,
                   help="warm-start alignment from this encoder checkpoint (the retraining job passes the "
                        "previous version's encoder/)")
    g.add_argument("--init_quantizer", default=None,
                   help="warm-start RQ codebooks from this saved quantizer (previous version's quantizer/)")
    g.add_argument("--swing_top_n", type=int, default=20, help="Swing partners kept per item")
    g.add_argument("--swing_alpha", type=float, default=1.0, help="Swing smoothing alpha")
    g.add_argument("--min_support", type=int, default=2, help="minimum co-occurring users of a pair")
    g.add_argument("--trigger_history", type=int, default=50, help="previous positives searched for a trigger")
    g.add_argument("--heldout_frac", type=float, default=0.1, help="latest share of positives held out")
    g.add_argument("--rq_levels", type=int, default=3, help="RQ levels")
    g.add_argument("--rq_codebook_size", type=int, default=0, help="centroids per RQ level (0: auto ~sqrt(N))")
    g.add_argument("--fit_sample", type=int, default=100_000, help="items the RQ codebooks are fitted on")
    g.add_argument("--vq_k", type=int, default=25, help="neighbours in the VQ code (QARM: 25)")
    g.add_argument("--vq_index", choices=("flat", "ivf"), default="flat", help="faiss index for the VQ k-NN")
    g.add_argument("--embed_batch_size", type=int, default=64, help="items per RunInference batch")
    g.add_argument("--torch_threads", type=int, default=2, help="torch threads per worker")
    g.add_argument("--align_min_ram", default=None,
                   help="resource hint for the single align worker, e.g. 16GB (runners that honour hints: Dataflow)")
    g.add_argument("--align_accelerator", default=None,
                   help="accelerator hint for the align step, e.g. 'type:nvidia-tesla-t4;count:1;install-nvidia-driver'")
    g.add_argument("--skip_unaligned", action="store_true",
                   help="do not embed/quantize with the unaligned encoder (no *_unaligned tables; ablation row f "
                        "and the aligned-vs-unaligned recall need them)")


class DataOptions(PipelineOptions):
    """The shared data-source flags (--dataset --data ... --seed)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_data_flags(parser)


class CascadeOptions(PipelineOptions):
    """Job flags of the cascade (see `add_cascade_flags`)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_cascade_flags(parser)


def data_spec(options: PipelineOptions) -> DataSpec:
    """The job's DataSpec, built through `data_spec_from_args` so no data flag is ever dropped."""
    return data_spec_from_args(options.view_as(DataOptions))


def cli_parser_flags(parser: argparse.ArgumentParser) -> None:
    """`qarm pipeline` flags: the same definitions as the PipelineOptions classes."""
    add_data_flags(parser)
    add_cascade_flags(parser)
