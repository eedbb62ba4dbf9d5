"""The pure interpolation math."""

from __future__ import annotations

import torch

from pituning.interpolation import init_logits, lora_concat, lora_delta, mixing_weights, svd_factorize, weighted_sum


def test_equal_init_and_softmax() -> None:
    alpha = mixing_weights(init_logits(4))
    torch.testing.assert_close(alpha, torch.full((4,), 0.25))
    assert mixing_weights(torch.tensor([0.0, 1.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_weighted_sum() -> None:
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    alpha = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(weighted_sum([a, b], alpha), 0.3 * a + 0.7 * b)
    torch.testing.assert_close(weighted_sum([a], torch.tensor([1.0])), a)


def test_lora_concat_is_the_sum_of_updates_without_cross_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(r, 6, generator=gen) for r in (2, 3)]
    b = [torch.randn(5, r, generator=gen) for r in (2, 3)]
    coef = torch.tensor([0.4, 1.5])
    a_cat, b_cat = lora_concat(a, b, coef)
    assert a_cat.shape == (5, 6) and b_cat.shape == (5, 5)
    expected = 0.4 * b[0] @ a[0] + 1.5 * b[1] @ a[1]
    torch.testing.assert_close(b_cat @ a_cat, expected)
    torch.testing.assert_close(lora_delta(a, b, coef), expected)
    # averaging A and B separately is not the same thing (cross terms)
    naive = (0.5 * b[0][:, :2] + 0.5 * b[1][:, :2]) @ (0.5 * a[0] + 0.5 * a[1][:2])
    assert not torch.allclose(naive, lora_delta(a, b, torch.tensor([0.5, 0.5])))


def test_svd_factorize_is_exact_at_the_update_rank_and_optimal_below() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(7, 3, generator=gen) @ torch.randn(3, 9, generator=gen)  # rank 3
    a, b = svd_factorize(delta, 3)
    assert a.shape == (3, 9) and b.shape == (7, 3)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    a, b = svd_factorize(delta, 12)  # more than min(7, 9): zero-padded, still exact
    assert a.shape == (12, 9)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    a, b = svd_factorize(delta, 1)
    s = torch.linalg.svdvals(delta)
    err = torch.linalg.matrix_norm(b @ a - delta)
    torch.testing.assert_close(err, s[1:].norm(), atol=1e-4, rtol=1e-4)
