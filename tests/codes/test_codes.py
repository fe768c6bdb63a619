"""dmuh.codes.binary: sign rule, bit packing round trips, padding invariance, Hamming distance on numpy and torch."""

import numpy as np
import pytest
import torch

from dmuh.codes.binary import as_packed, hamming_distance, pack_bits, sign, unpack_bits
from dmuh.errors import DmuhError

BIT_LENGTHS = [1, 7, 8, 9, 12, 24, 32, 48, 63, 64, 65, 128, 130]


def random_codes(rows, bits, seed=0):
    return np.random.default_rng(seed).choice(np.array([-1, 1], dtype=np.int8), size=(rows, bits))


def brute_force_hamming(a, b):
    return (a[:, None, :] != b[None, :, :]).sum(-1)


def test_sign_maps_zero_to_plus_one_and_keeps_types():
    values = np.array([[-2.0, -1e-12, 0.0, 1e-12, 3.0]], dtype=np.float32)
    assert sign(values).tolist() == [[-1, -1, 1, 1, 1]] and sign(values).dtype == np.float32
    assert sign(np.array([0, -3, 4])).dtype == np.int8
    tensor = sign(torch.tensor([[0.0, -0.5, 0.5]], dtype=torch.float64, requires_grad=True).detach())
    assert tensor.tolist() == [[1.0, -1.0, 1.0]] and tensor.dtype == torch.float64
    assert sign(torch.tensor([0, -1])).dtype == torch.int8
    assert sign(np.float32(0.0)) == 1


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_pack_unpack_round_trip(bits):
    codes = random_codes(9, bits, seed=bits)
    packed = pack_bits(codes)
    assert packed.dtype == np.uint8 and packed.shape == (9, -(-bits // 8))
    assert np.array_equal(unpack_bits(packed, bits), codes)
    tensor_packed = pack_bits(torch.from_numpy(codes))
    assert torch.equal(tensor_packed, torch.from_numpy(packed))
    assert torch.equal(unpack_bits(tensor_packed, bits), torch.from_numpy(codes))


def test_packing_order_is_numpy_packbits_with_zero_padding():
    codes = np.array([[1, -1, -1, -1, -1, -1, -1, -1, 1, 1, -1, -1]])
    assert pack_bits(codes).tolist() == [[0b10000000, 0b11000000]]
    assert np.array_equal(pack_bits(codes), pack_bits((codes > 0).astype(np.uint8)))  # {0,1} input
    assert np.array_equal(pack_bits(codes), pack_bits(codes > 0))  # bool input


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_hamming_distance_matches_brute_force_packed_or_not(bits):
    a, b = random_codes(6, bits, seed=1), random_codes(5, bits, seed=2)
    expected = brute_force_hamming(a, b)
    for left, right in [(a, b), (pack_bits(a), pack_bits(b)), (a, pack_bits(b))]:
        distance = hamming_distance(left, right, bits=bits)
        assert distance.dtype == np.int32 and np.array_equal(distance, expected)
    distance = hamming_distance(torch.from_numpy(a), torch.from_numpy(pack_bits(b)), bits=bits)
    assert isinstance(distance, torch.Tensor) and np.array_equal(distance.numpy(), expected)


@pytest.mark.parametrize("bits", [12, 48, 130])
def test_padding_bits_never_change_a_distance(bits):
    a, b = pack_bits(random_codes(4, bits, seed=3)), pack_bits(random_codes(3, bits, seed=4))
    dirty_a = a.copy()
    dirty_a[:, -1] |= (1 << (8 * a.shape[1] - bits)) - 1  # set every padding bit
    assert np.array_equal(hamming_distance(dirty_a, b, bits=bits), hamming_distance(a, b, bits=bits))
    assert np.array_equal(as_packed(dirty_a, bits)[0], a)
    assert np.array_equal(as_packed(torch.from_numpy(dirty_a), bits)[0].numpy(), a)


def test_hamming_distance_without_faiss(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    a, b = random_codes(7, 70, seed=5), random_codes(4, 70, seed=6)
    assert np.array_equal(hamming_distance(a, b), brute_force_hamming(a, b))


def test_numpy_without_bitwise_count_uses_the_byte_table(monkeypatch):
    a, b = random_codes(5, 100, seed=7), random_codes(6, 100, seed=8)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    from dmuh.codes.binary import distance_rows, packed_words

    out = np.empty((5, 6), dtype=np.uint8)
    distance_rows(packed_words(pack_bits(a)), packed_words(pack_bits(b)), out)
    assert np.array_equal(out, brute_force_hamming(a, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bits", [12, 64, 2100])
def test_hamming_distance_on_gpu(bits):
    a, b = random_codes(20, bits, seed=9), random_codes(30, bits, seed=10)
    distance = hamming_distance(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda())
    assert distance.is_cuda and np.array_equal(distance.cpu().numpy(), brute_force_hamming(a, b))


def test_bad_codes_are_rejected_with_the_argument_name():
    with pytest.raises(DmuhError, match="codes: expected binary codes"):
        pack_bits(np.array([[0.5, -1.0]]))
    with pytest.raises(DmuhError, match="codes: expected binary codes"):
        pack_bits(np.array([[0, -1, 1]]))  # mixes the two conventions
    with pytest.raises(DmuhError, match="a: expected a 2-D"):
        hamming_distance(np.ones(8), np.ones((1, 8)))
    with pytest.raises(DmuhError, match="b: codes of 16 bits"):
        hamming_distance(np.ones((1, 8)), np.ones((1, 16)))
    with pytest.raises(DmuhError, match="cannot hold bits=20"):
        as_packed(np.zeros((1, 2), dtype=np.uint8), bits=20)
    with pytest.raises(DmuhError, match="codes: has 8 bits but bits=9"):
        as_packed(np.ones((1, 8)), bits=9)
