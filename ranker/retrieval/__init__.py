"""Retrieval stage and PromptMM-style multimodal knowledge distillation (issue 14).

A multimodal teacher (ids + the store's aligned / per-modality item embeddings through small projection towers,
soft prompts on its modality inputs) is distilled into a light id student (list-wise KD, reliability-weighted
per-modality KD); faiss top-K candidates; Recall@K / NDCG@K under full ranking; the student's item vectors double
as the collaborative item similarity for QARM's trigger pairs.

Modules (one job each):
    config   RetrievalConfig, DistillConfig, ROWS            losses   BPR, sampled softmax, KD losses, reliability
    data     protocol split -> RetrievalData; store tables   models   StudentArch, TeacherArch and their *Arch parts
    fit      fit_teacher, fit_student, evaluate,             index    faiss ItemIndex, serving timing
             student_item_vectors                            metrics  recall_at_k, ndcg_at_k, paired bootstrap
    report   run_distill (the `qarm distill` study)          cascade  retrieve_candidates, rerank_candidates
    train    `python -m ranker.retrieval.train` / torchrun entry over contract Parquet tables

Importing this package imports nothing heavy; import the modules you need.
"""
