"""Each retrieval / KD loss against a hand-computed example."""
import math

import pytest
import torch

from ranker.retrieval.losses import (bpr_loss, kl_rows, listwise_kd_loss, modality_kd_loss, reliability_weights,
                                     sampled_softmax_loss)

LN3 = math.log(3.0)


def test_bpr_loss():
    loss = bpr_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    # -(log σ(1) + log σ(0)) / 2 = (log(1 + e^-1) + log 2) / 2
    assert float(loss) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)


def test_sampled_softmax_masks_accidental_hits():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 0.0]])
    assert float(sampled_softmax_loss(pos, neg)) == pytest.approx(math.log(math.e + 2) - 1)
    masked = sampled_softmax_loss(pos, neg, hit_mask=torch.tensor([[True, False]]))
    assert float(masked) == pytest.approx(math.log(math.e + 1) - 1)


def test_listwise_kd_by_hand():
    teacher = torch.tensor([[0.0, LN3]])        # p_T = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])        # p_S = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)   # 0.1308
    assert float(listwise_kd_loss(teacher, student)) == pytest.approx(expected)
    # temperature 2: p_T = (1, √3) / (1 + √3), scaled by τ² = 4
    a = 1 / (1 + math.sqrt(3))
    expected_t2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert float(listwise_kd_loss(teacher, student, temperature=2.0)) == pytest.approx(expected_t2)
    # identical distributions: zero; the loss is a mean over rows
    two_rows = torch.cat([teacher, teacher])
    assert float(listwise_kd_loss(two_rows, torch.cat([student, teacher]))) == pytest.approx(expected / 2)


def test_kl_mask_drops_a_candidate():
    teacher = torch.tensor([[0.0, LN3, 5.0]])
    student = torch.tensor([[0.0, 0.0, -5.0]])
    mask = torch.tensor([[True, True, False]])
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(kl_rows(teacher, student, mask=mask)[0]) == pytest.approx(expected)


def test_reliability_label_weights_by_hand():
    # two modalities, candidates [observed positive, other]
    mods = torch.tensor([[[LN3, 0.0]],          # modality A: p_A(positive) = 3/4
                         [[0.0, LN3]]])         # modality B: p_B(positive) = 1/4
    w = reliability_weights(mods, "label")
    assert w.shape == (1, 2)
    assert w[0].tolist() == pytest.approx([1.5, 0.5])          # 2 * (3/4, 1/4) / 1
    assert reliability_weights(mods, "uniform")[0].tolist() == [1.0, 1.0]
    # confidence: A and B have the same entropy -> equal weights; a peaked modality weighs more
    assert reliability_weights(mods, "confidence")[0].tolist() == pytest.approx([1.0, 1.0])
    peaked = torch.tensor([[[10.0, 0.0]], [[0.0, 0.0]]])
    wc = reliability_weights(peaked, "confidence")[0]
    assert wc[0] > 1.0 > wc[1]


def test_modality_kd_by_hand():
    mods = torch.tensor([[[LN3, 0.0]], [[0.0, LN3]]])
    student = torch.tensor([[LN3, 0.0]])        # agrees with A exactly: KL_A = 0
    w = reliability_weights(mods, "label")      # (1.5, 0.5)
    kl_b = 0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25)   # = 0.5 ln 3
    expected = (1.5 * 0.0 + 0.5 * kl_b) / 2
    assert float(modality_kd_loss(mods, student, w)) == pytest.approx(expected)
    # the noisy modality (B) teaches less: with uniform weights the loss is larger
    assert float(modality_kd_loss(mods, student, reliability_weights(mods, "uniform"))) == pytest.approx(kl_b / 2)


def test_reliability_has_no_gradient():
    mods = torch.tensor([[[LN3, 0.0]], [[0.0, LN3]]], requires_grad=True)
    assert not reliability_weights(mods, "label").requires_grad
