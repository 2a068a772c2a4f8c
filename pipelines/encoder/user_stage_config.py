"""Every knob of the cascade's user-prompt stage (pipelines.beam.user_prompt_stage) in one frozen, validated
dataclass: the stage trains the VIP5-style user encoder (pipelines.encoder.user_encoder) after the aligned item
embeddings exist and writes user_embeddings.parquet into the version being published.

Each field is one job flag, ``--`` + the field name with ``_`` -> ``-`` (``user_prompt_epochs`` ->
``--user-prompt-epochs``); the help text is the field's ``metadata["help"]``; the defaults are
UserEncoderConfig's (read from it here, never repeated). The seed and torch threads are the job's own
(the cascade seed, --torch-threads), so they are no field of this stage.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from pipelines.encoder.user_encoder import UserEncoderConfig
from pipelines.encoder.user_prompts import TEMPLATES

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(UserEncoderConfig)}


def _knob(name: str, help: str):
    """A field whose default is UserEncoderConfig's ``name``."""
    return field(default=_DEFAULTS[name], metadata={"help": help, "encoder_field": name})


@dataclass(frozen=True)
class UserPromptStageConfig:
    """The user-prompt stage of the cascade job (off by default: with ``user_prompts`` False the job and its
    version are exactly as without the stage). See UserEncoderConfig for what each knob does."""

    user_prompts: bool = field(default=False, metadata={
        "help": "add the user-prompt stage: train the MLLM user encoder over VIP5-style personalized prompts of the "
                "protocol's train portion (never worse than history pooling, its step 0) and write "
                "user_embeddings.parquet into this version (manifest.metrics.user_prompts: what shipped)"})
    user_prompt_template: str = _knob("template", "prompt template, one of " + ", ".join(sorted(TEMPLATES)))
    user_prompt_max_events: int = _knob("max_events", "last train-portion positives a prompt reads")
    user_prompt_token_budget: int = _knob("token_budget", "LM tokens per prompt at most (oldest events dropped)")
    user_prompt_image_tokens: int = _knob("image_tokens", "image tokens per item in a prompt")
    user_prompt_title_tokens: int = _knob("title_tokens", "word pieces of each item title in a prompt")
    user_prompt_train_cuts: int = _knob("train_cuts", "training prompts per user (cut before each of its last N "
                                                      "train positives)")
    user_prompt_max_train: Optional[int] = _knob("max_train_prompts", "cap on training prompts (seeded sample; "
                                                                      "default: no cap)")
    user_prompt_negatives: int = _knob("negatives", "catalog items sampled per batch as extra negatives "
                                                    "(0: in-batch only)")
    user_prompt_adapters: bool = _knob("adapters", "VIP5 bottleneck adapters in the frozen LM (false: id tokens "
                                                   "+ head only); true or false")
    user_prompt_adapter_reduction: int = _knob("adapter_reduction", "adapter bottleneck reduction factor")
    user_prompt_epochs: int = _knob("epochs", "user encoder training epochs at most")
    user_prompt_batch_size: int = _knob("batch_size", "prompts per contrastive batch")
    user_prompt_lr: float = _knob("lr", "user encoder learning rate")
    user_prompt_temperature: float = _knob("temperature", "InfoNCE temperature")
    user_prompt_patience: int = _knob("patience", "epochs without a better validation score before stopping")
    user_prompt_gate_z: float = _knob("gate_z", "never-worse gate: the trained encoder replaces step 0 (history "
                                                "pooling) only when its validation recall@10 gain minus this many "
                                                "paired standard errors is above 0")
    user_prompt_device: str = _knob("device", "torch device of the user encoder (cpu, cuda)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind, optional = field_type(f)
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
                kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"user-prompt stage: {flag_name(f.name)} must be {_KIND_WORDS[kind]}"
                                 f"{' or unset' if optional else ''}, got {value!r}")
        try:
            self.encoder_config()
        except ValueError as exc:  # name the flag, not the library field
            raise ValueError(f"user-prompt stage: {_flag_message(str(exc))}") from None

    def encoder_config(self, seed: int = 0, num_threads: Optional[int] = None) -> UserEncoderConfig:
        """The UserEncoderConfig this stage trains with (``seed``: the cascade seed; ``num_threads``: the
        worker's torch threads)."""
        knobs = {f.metadata["encoder_field"]: getattr(self, f.name) for f in dataclasses.fields(self)
                 if "encoder_field" in f.metadata}
        return UserEncoderConfig(**knobs, seed=seed, num_threads=num_threads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_type(f: dataclasses.Field) -> tuple:
    """(bool | int | float | str, optional) of a UserPromptStageConfig field, from its annotation."""
    hint = typing.get_type_hints(UserPromptStageConfig)[f.name]
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else ()
    if args:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def flag_name(field_name: str) -> str:
    """``user_prompt_epochs`` -> ``--user-prompt-epochs``."""
    return "--" + field_name.replace("_", "-")


def _flag_message(message: str) -> str:
    """UserEncoderConfig's message with its field names written as this stage's flags."""
    by_encoder = {f.metadata["encoder_field"]: flag_name(f.name) for f in dataclasses.fields(UserPromptStageConfig)
                  if "encoder_field" in f.metadata}
    names = "|".join(sorted(by_encoder, key=len, reverse=True))
    message = re.sub(rf"(?:UserEncoderConfig\.)?\b({names})\b", lambda m: by_encoder[m.group(1)], message)
    return message.replace("UserEncoderConfig: ", "")
