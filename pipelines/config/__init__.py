"""Typed config trees of the jobs: frozen, validated section dataclasses whose knobs generate the command line,
the Beam options, --config / --print-config and the manifest's resolved config (`feature_store.config_tree`).

cascade.py: the batch job's tree (CascadeConfig) and its sections; ranker.py / retrieval.py: the trees of the
commands that read a version (train-ranker, eval, distill, retrieve). Layer 1: above the library (data, encoder,
mining), below the Beam code; no Beam here.
"""
