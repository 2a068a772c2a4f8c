"""VIP5-style personalized prompts (issue 22): template rendering, the cut, truncation, the user encoder's step 0,
the never-worse gate, resume, and a tiny decoder LM."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.encoder import EncoderConfig
from pipelines.encoder.encoder import build_encoder
from pipelines.encoder.items import ItemCatalog
from pipelines.encoder.user_encoder import (UserEncoderConfig, build_user_prompt_task, encode_prompts,
                                            next_item_ranks, train_user_encoder)
from pipelines.encoder.user_prompts import (TEMPLATES, PromptTemplate, build_prompt, events_by_user,
                                            next_item_cuts, training_cuts)

TITLES = {1: "Toy Story", 2: "Heat", 3: "Up", 4: "Alien"}


def test_sequential_template_renders_a_hand_made_log():
    events = [(1, 100), (2, 200), (4, 250), (3, 300)]   # (item, ts); item 4 has no image
    p = build_prompt(9, events, cut_ts=300, template=TEMPLATES["sequential"], titles=TITLES,
                     has_image={1, 2, 3}.__contains__)
    assert p.item_ids == (1, 2, 4)
    assert p.render(TITLES) == ("user_9 has watched: item_1 <image> Toy Story ; item_2 <image> Heat ; "
                                "item_4 Alien ; what is the next item?")
    assert [k for k, _ in p.segments].count("user") == 1


def test_templates_are_data():
    t = PromptTemplate("mine", "history of {user} :", "{title} {image}", "|", "-> ?")
    p = build_prompt(5, [(2, 1), (3, 2)], 10, t, titles=TITLES)
    assert p.render(TITLES) == "history of user_5 : Heat <image> | Up <image> -> ?"
    with pytest.raises(ValueError, match="prefix only"):
        PromptTemplate("bad", "x", "{item} {user}", ";", ".")
    with pytest.raises(ValueError, match="unknown placeholder"):
        PromptTemplate("bad", "x", "{item} {price}", ";", ".")


def test_a_prompt_never_reads_an_event_at_or_after_its_cut():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ts = rng.integers(0, 20, size=rng.integers(1, 12))
        events = [(int(i), int(t)) for i, t in zip(rng.integers(0, 50, len(ts)), ts)]
        cut = int(rng.integers(0, 22))
        p = build_prompt(1, events, cut, TEMPLATES["sequential"], max_events=5, token_budget=1000)
        read = [e for e in sorted(events, key=lambda e: e[1]) if e[1] < cut][-5:]
        assert list(p.item_ids) == [i for i, _ in read]


def test_truncation_keeps_the_latest_events_within_the_budget():
    events = [(i, i) for i in range(1, 30)]
    t = TEMPLATES["sequential"]
    assert build_prompt(1, events, 100, t, max_events=4, token_budget=1000).item_ids == (26, 27, 28, 29)
    # fixed part: "has watched:" (2) + user (1) + "; what is the next item?" (6) = 9; an event: item + image = 2,
    # separators 1 each -> 9 + 3 events * 2 + 2 separators = 17
    p = build_prompt(1, events, 100, t, max_events=20, token_budget=17)
    assert p.item_ids == (27, 28, 29)
    with pytest.raises(ValueError, match="over the budget"):
        build_prompt(1, events, 100, t, token_budget=5)


def test_cuts_come_from_the_log_not_the_future():
    pos = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [1, 2, 3, 4, 1], "ts": [5, 5, 9, 1, 3]})
    ev = events_by_user(pos)
    # user 1: item 2 shares item 1's ts (no strictly earlier event): only item 3 is a target
    assert sorted(training_cuts(ev, 3)) == [(1, 9, 3), (2, 3, 1)]
    assert next_item_cuts(pos) == [(2, 1, 4), (1, 5, 1)]


def _world(tmp_path, n_items=24, n_users=30, seed=0):
    """Items in 3 groups (image colour + a title word); each user stays in one group."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        g = i % 3
        Image.fromarray(np.full((16, 16, 3), 80 * g, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"item_id": i, "title": f"w{g} w{i}", "text": None, "image_uri": f"{i}.png"})
    inter = []
    for u in range(n_users):
        g = u % 3
        for t in range(8):
            inter.append((u, int(rng.choice(np.arange(g, n_items, 3))), 100 * u + t))
    inter = pd.DataFrame(inter, columns=["user_id", "item_id", "ts"])
    return pd.DataFrame(rows), inter


def _task(tmp_path, enc_cfg, cfg):
    items, inter = _world(tmp_path)
    mllm = build_encoder(enc_cfg)
    catalog = ItemCatalog.from_dataset(SimpleNamespace(items=items, image_root=tmp_path), enc_cfg)
    ids = items["item_id"].to_numpy()
    vecs = torch.nn.functional.normalize(torch.randn(len(ids), enc_cfg.embed_dim,
                                                     generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    last = inter.groupby("user_id")["ts"].transform("max") == inter["ts"]
    return build_user_prompt_task(mllm, catalog, ids, vecs, inter[~last], inter[last], cfg), vecs


def test_step0_is_the_history_pooled_aligned_embedding(tmp_path):
    cfg = UserEncoderConfig(max_events=3, token_budget=28)
    task, vecs = _task(tmp_path, EncoderConfig.named("tiny"), cfg)
    assert task.stats["items_with_image_tokens"] == 24 and task.stats["adapters"] > 0
    got = encode_prompts(task.model, task.serve, task.collate)
    for p, v in zip(task.serve, got):
        base = torch.nn.functional.normalize(torch.tensor(vecs[list(p.item_ids)]).sum(0), dim=0)
        np.testing.assert_array_equal(v, torch.nn.functional.normalize(base, dim=0).numpy())  # normalize(base + 0)


def test_next_item_ranks_exclude_training_positives():
    items = np.eye(4, dtype=np.float32)
    users = np.array([[0.9, 0.5, 0.1, 0.0]], dtype=np.float32)
    assert next_item_ranks(users, items, np.array([2]), [[]]).tolist() == [3]
    assert next_item_ranks(users, items, np.array([2]), [[0, 2]]).tolist() == [2]   # the target is never excluded


def test_training_ships_step0_or_a_better_epoch_and_resumes(tmp_path):
    cfg = UserEncoderConfig(max_events=3, token_budget=28, epochs=2, batch_size=8, lr=5e-3, gate_z=0.0,
                            patience=0)
    task, _ = _task(tmp_path, EncoderConfig.named("tiny"), cfg)
    out = tmp_path / "ue"
    res = train_user_encoder(task.model, task.collate, task.train, task.valid, cfg, out_dir=out)
    assert res.steps > 0 and len(res.history) == 2 and res.alignment["judge"] == "valid_next_item"
    shipped = encode_prompts(task.model, task.valid[0], task.collate)
    ranks = next_item_ranks(shipped, task.model.item_vectors.numpy(), np.asarray(task.valid[1]), task.valid[2])
    step0 = res.alignment["valid_next_item"]["step0"]["recall@10"]
    assert np.mean(ranks <= 10) == pytest.approx(res.alignment["valid_next_item"]["best"]["recall@10"])
    assert np.mean(ranks <= 10) >= step0 or not res.alignment["kept"]
    # resume: the same out_dir with a larger epoch budget continues after epoch 2, not from scratch
    task2, _ = _task(tmp_path, EncoderConfig.named("tiny"), cfg)
    cfg3 = UserEncoderConfig(**{**cfg.to_dict(), "epochs": 3})
    res3 = train_user_encoder(task2.model, task2.collate, task2.train, task2.valid, cfg3, out_dir=out)
    assert [h["epoch"] for h in res3.history] == [1, 2, 3] and res3.steps > res.steps


def test_a_tiny_decoder_lm_reads_prompts(tmp_path):
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "user", "item", "has", "watched"] + [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=24, n_layer=2, n_head=2, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(tmp_path / "lm")
    enc_cfg = EncoderConfig.named("tiny", text=f"hf:{tmp_path / 'lm'}", embed_dim=8)
    cfg = UserEncoderConfig(max_events=4, token_budget=64, epochs=1, batch_size=8, gate_z=0.0)
    task, _ = _task(tmp_path, enc_cfg, cfg)
    assert task.model.mllm.text.pooling == "last"
    res = train_user_encoder(task.model, task.collate, task.train, task.valid, cfg)
    assert res.steps > 0 and res.loss_first is not None
    v = encode_prompts(task.model, task.serve, task.collate)
    assert v.shape == (30, 8) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_a_sampled_negative_that_is_the_target_is_masked():
    from pipelines.encoder.user_encoder import _contrastive_loss
    items = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    users = items[[0]] + 0.1
    targets = torch.tensor([0])
    plain = _contrastive_loss(users, items, targets, torch.tensor([3, 4]), 0.1)
    with_hits = _contrastive_loss(users, items, targets, torch.tensor([3, 0, 4, 0]), 0.1)  # accidental hits
    assert torch.allclose(plain, with_hits)
    harder = _contrastive_loss(users, items, targets, torch.tensor([3, 4, 5]), 0.1)
    assert harder > plain


# ------------------------------------------------------------- point-in-time (as-of) vectors for the ranker (issue 22)

def test_asof_cuts_of_a_hand_made_log():
    from pipelines.encoder.user_prompts import asof_cuts
    ev = {1: [(1, 5), (2, 5), (3, 9), (4, 12)], 2: [(7, 3)]}
    # user 1: 5 is its first time (nothing before it): cuts before the positives at 9 and 12, then its end 12 + 1
    assert asof_cuts(ev, 2) == [(1, 9), (1, 12), (1, 13), (2, 4)]
    assert asof_cuts(ev, 1) == [(1, 9), (1, 13), (2, 4)]  # spread from the earliest possible cut
    long = {3: [(i, t) for i, t in enumerate(range(10, 110, 10))]}  # positives at 10, 20, ..., 100
    assert asof_cuts(long, 3) == [(3, 20), (3, 50), (3, 80), (3, 101)]
    assert asof_cuts(ev, 9) == asof_cuts(ev, 2)
    with pytest.raises(ValueError, match="per_user"):
        asof_cuts(ev, 0)


def test_asof_vectors_read_only_events_before_their_cut_with_the_same_encoder(tmp_path):
    from feature_store.tables import read_asof_embeddings, read_embeddings
    from pipelines.encoder.user_encoder import (ASOF_TABLE, USER_TABLE, UserVectors, encode_asof,
                                                write_user_tables)
    cfg = UserEncoderConfig(max_events=3, token_budget=28, asof_cuts=2)
    task, _ = _task(tmp_path, EncoderConfig.named("tiny"), cfg)
    # make the encoder not history pooling (head away from zero), so "the same encoder" is a real check
    with torch.no_grad():
        for p in task.model.trainable_state().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    users = np.array([p.user_id for p in task.serve], np.int64)
    serve = encode_prompts(task.model, task.serve, task.collate)
    asof = encode_asof(task, users, serve, cfg.asof_cuts)
    # each user of _world has 7 train positives at ts 100u + 0..6: 2 cuts spread over 100u + 1..6 (at + 1 and
    # + 4) and its end 100u + 7
    assert asof.user_ids.tolist() == np.repeat(users, 3).tolist()
    assert asof.cut_ts.tolist() == [100 * u + k for u in users for k in (1, 4, 7)]
    for u, c, p in zip(asof.user_ids, asof.cut_ts, asof.prompts):
        assert p.user_id == u
        before = [i for i, t in sorted(task.events[int(u)], key=lambda e: e[1]) if t < c]
        assert p.item_ids and tuple(before[-len(p.item_ids):]) == p.item_ids  # the latest events before the cut
        at_or_after = {i for i, t in task.events[int(u)] if t >= c} - {i for i, t in task.events[int(u)] if t < c}
        assert not set(p.item_ids) & at_or_after
    end = asof.cut_ts == np.repeat([100 * u + 7 for u in users], 3)
    np.testing.assert_array_equal(asof.vectors[end], serve)        # the train-end rows are the serving vectors
    np.testing.assert_allclose(encode_prompts(task.model, [p for p, e in zip(asof.prompts, end) if e], task.collate),
                               serve, atol=1e-6)                  # ... whose prompts read the same events
    earlier = [p for p, e in zip(asof.prompts, end) if not e]
    np.testing.assert_allclose(asof.vectors[~end], encode_prompts(task.model, earlier, task.collate), atol=1e-6)
    assert not np.allclose(asof.vectors[~end][0::2], serve)      # an earlier cut is another vector
    # both tables through the one writer
    fit = UserVectors(users, serve, serve, task, None, 0.0, asof)
    write_user_tables(tmp_path, fit)
    got_u, got_c, got_v = read_asof_embeddings(tmp_path / ASOF_TABLE)
    assert got_u.tolist() == asof.user_ids.tolist() and got_c.tolist() == asof.cut_ts.tolist()
    np.testing.assert_array_equal(got_v, asof.vectors)
    s_users, s_vecs = read_embeddings(tmp_path / USER_TABLE, id_column="user_id")
    np.testing.assert_array_equal(got_v[got_c == np.repeat([100 * u + 7 for u in s_users], 3)], s_vecs)
