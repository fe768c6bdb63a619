"""Binary codes: sign, bit packing and Hamming distance, for numpy arrays and torch tensors (CPU or GPU).

Conventions, used everywhere in dmuh:

- A code is a row of b bits. Unpacked, a bit is +1/-1 (or 1/0, or True/False): +1 = 1 = True.
- Packed codes are uint8 of shape (n, ceil(b / 8)) in `np.packbits` order: bit j of a code is bit
  7 - j % 8 (most significant first) of byte j // 8. The padding bits of the last byte are 0 in
  every code, so padding never changes a Hamming distance; packed input whose padding is not 0 is
  masked when `bits` is given.
- Every function that takes codes accepts them unpacked ({-1,+1} or {0,1}, any numeric or bool
  dtype) or packed (dtype uint8, with `bits` when b is not a multiple of 8): `as_packed` is the
  one place that tells them apart.

This module does not import torch: a tensor can only reach it once torch is loaded, so the tensor
paths take the module from `sys.modules` (`_torch`). Commands that run no network (`dmuh index
build`, `dmuh search` of codes) then never pay for importing it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Tuple, Union

import numpy as np

from dmuh.errors import DmuhError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Array = Union[np.ndarray, "torch.Tensor"]


def _torch():
    """The torch module, when loaded (None otherwise: then no tensor exists)."""
    return sys.modules.get("torch")


def _is_tensor(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


# fp16 holds every integer up to 2048 exactly: a matmul of +-1 codes over at most this many bits is
# exact even if partial sums are kept in fp16.
EXACT_FP16_BITS = 2048


def sign(x: Array) -> Array:
    """Binary code of real values: +1 where x >= 0, -1 where x < 0. **sign(0) = +1** (NaN gives -1).

    Returns the same kind of object: a tensor keeps its dtype (a float tensor stays float, so
    `h - sign(h)` works) and device; a numpy float array keeps its dtype; integer input gives int8.
    """
    if _is_tensor(x):
        torch = _torch()
        dtype = x.dtype if x.is_floating_point() else torch.int8
        one = torch.ones((), dtype=dtype, device=x.device)
        return torch.where(x >= 0, one, -one)
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.int8
    return np.where(x >= 0, 1, -1).astype(dtype)


def _bit_values(codes: Array, name: str) -> Array:
    """Bool (n, b) of unpacked codes given as {-1,+1} or {0,1} (or bool): True where the bit is 1."""
    tensor = _is_tensor(codes)
    if codes.dtype == (_torch().bool if tensor else np.bool_):
        return codes
    is_one = codes == 1
    count = (lambda x: int(x.sum())) if tensor else np.count_nonzero
    rest = codes.shape[0] * codes.shape[1] - count(is_one)
    # every other value is -1 (+-1 codes), or every other value is 0 (0/1 codes)
    if rest and count(codes == -1) != rest and count(codes == 0) != rest:
        raise DmuhError(
            f"{name}: expected binary codes, {{-1,+1}} or {{0,1}} (use dmuh.codes.binary.sign), or packed uint8"
        )
    return is_one


def _check_matrix(codes, name: str) -> Array:
    if not _is_tensor(codes):
        codes = np.asarray(codes)
    if codes.ndim != 2:
        raise DmuhError(f"{name}: expected a 2-D (items, bits) array, got shape {tuple(codes.shape)}")
    return codes


def _pack_bool(bits: Array) -> Array:
    """Pack a bool (n, b) array/tensor to uint8 (n, ceil(b/8)), np.packbits order."""
    if isinstance(bits, np.ndarray):
        return np.packbits(bits, axis=1)
    torch = _torch()
    if bits.device.type == "cpu":  # numpy's packbits, without the int32 temporaries below
        return torch.from_numpy(np.packbits(bits.numpy(), axis=1))
    n, b = bits.shape
    padded = torch.zeros((n, -(-b // 8) * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :b] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=bits.device)
    return (padded.view(n, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def pack_bits(codes: Array) -> Array:
    """Pack unpacked codes (n, b), {-1,+1} or {0,1} of any dtype (uint8 included), to uint8 (n, ceil(b/8)).

    numpy in, numpy out; a tensor stays on its device. The padding bits are 0.
    """
    codes = _check_matrix(codes, "codes")
    return _pack_bool(_bit_values(codes, "codes"))


def unpack_bits(packed: Array, bits: int) -> Array:
    """Inverse of `pack_bits`: int8 (n, bits) of -1/+1."""
    packed = _check_matrix(packed, "packed")
    if bits < 1 or -(-bits // 8) != packed.shape[1]:
        nbytes = packed.shape[1]
        raise DmuhError(f"bits: {bits} bits do not fill {nbytes} packed bytes (need {8 * nbytes - 7}..{8 * nbytes})")
    if isinstance(packed, np.ndarray):
        return np.unpackbits(packed.astype(np.uint8, copy=False), axis=1, count=bits).astype(np.int8) * 2 - 1
    torch = _torch()
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    unpacked = (packed.to(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(packed.shape[0], -1)[:, :bits].to(torch.int8) * 2 - 1


def _mask_padding(packed: Array, bits: int) -> Array:
    """Zero the padding bits (the low bits of the last byte); a copy only when one is set."""
    spare = packed.shape[1] * 8 - bits
    if spare == 0 or not bool((packed[:, -1] & ((1 << spare) - 1)).any()):
        return packed
    packed = packed.copy() if isinstance(packed, np.ndarray) else packed.clone()
    packed[:, -1] &= 0xFF ^ ((1 << spare) - 1)
    return packed


def as_packed(codes, bits: Optional[int] = None, name: str = "codes") -> Tuple[Array, int]:
    """The one normalisation of code input: (packed uint8 (n, ceil(b/8)), b).

    `codes` is a numpy array / tensor (or nested list) of shape (n, b) with values {-1,+1} or {0,1}
    (any numeric or bool dtype) or, with dtype uint8, already packed; `bits` is b for packed
    input (default: 8 x bytes). numpy stays numpy, a tensor stays a tensor on its device. `name`
    is used in error messages.
    """
    codes = _check_matrix(codes, name)
    packed_input = codes.dtype == (_torch().uint8 if _is_tensor(codes) else np.uint8)
    if not packed_input:
        if bits is not None and bits != codes.shape[1]:
            raise DmuhError(f"{name}: has {codes.shape[1]} bits but bits={bits}")
        return _pack_bool(_bit_values(codes, name)), codes.shape[1]
    if bits is None:
        bits = codes.shape[1] * 8
    if bits < 1 or -(-bits // 8) != codes.shape[1]:
        raise DmuhError(f"{name}: {codes.shape[1]} packed bytes cannot hold bits={bits}")
    return _mask_padding(codes, bits), bits


def plus_minus_one(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """+-1 codes (n, bits) of the given float dtype from packed uint8, on the tensor's device."""
    return unpack_bits(packed, bits).to(dtype)


def packed_words(packed: np.ndarray) -> np.ndarray:
    """uint64 (W, n) words of packed codes (W = ceil(bytes / 8), zero-padded), one contiguous row per word.

    The distance loops xor one word of every database item at a time, so words are rows.
    """
    n, nbytes = packed.shape
    words = -(-nbytes // 8)
    padded = np.zeros((n, words * 8), dtype=np.uint8)
    padded[:, :nbytes] = packed
    return np.ascontiguousarray(padded.view(np.uint64).T)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 in `words`, written to `out` (same shape, an integer dtype)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one hardware popcount per word
        return np.bitwise_count(words, out=out)
    per_byte = _BYTE_POPCOUNT[words.view(np.uint8)].reshape(*words.shape, 8)
    return np.sum(per_byte, axis=-1, out=out, dtype=out.dtype)


def distance_dtype(bits: int):
    """Smallest numpy unsigned dtype holding distances 0..bits."""
    return np.uint8 if bits <= 255 else np.uint16 if bits <= 65535 else np.uint32


def distance_rows(query_words: np.ndarray, db_words: np.ndarray, out: np.ndarray, block: int = 16384) -> np.ndarray:
    """Hamming distances of q queries to n database items from `packed_words` layouts.

    query_words (W, q), db_words (W, n) uint64; `out` (q, n) of an integer dtype wide enough for
    the bit length (`distance_dtype`). The database is walked in blocks so the xor temporaries stay
    in cache.
    """
    n_words, n_queries = query_words.shape
    n_items = db_words.shape[1]
    width = min(block, n_items)
    xor = np.empty((n_queries, width), dtype=np.uint64)
    word_counts = np.empty((n_queries, width), dtype=np.uint8) if n_words > 1 else None
    queries = [query_words[w][:, None] for w in range(n_words)]
    for start in range(0, n_items, block):
        stop = min(start + block, n_items)
        size = stop - start
        target = out[:, start:stop]
        for w in range(n_words):
            np.bitwise_xor(queries[w], db_words[w, None, start:stop], out=xor[:, :size])
            if w == 0:
                popcount(xor[:, :size], out=target)
            else:
                popcount(xor[:, :size], out=word_counts[:, :size])
                target += word_counts[:, :size]
    return out


def _hamming_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:  # faiss' popcount kernels are faster and multi-threaded; optional
        import faiss
    except ImportError:
        faiss = None
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    if faiss is not None and a.shape[0] and b.shape[0]:
        a8, b8 = np.ascontiguousarray(a), np.ascontiguousarray(b)
        faiss.hammings(
            faiss.swig_ptr(a8), faiss.swig_ptr(b8), a8.shape[0], b8.shape[0], a8.shape[1], faiss.swig_ptr(out)
        )
        return out
    return distance_rows(packed_words(a), packed_words(b), out)


def plus_minus_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 dot products (n, m) of +-1 codes a (n, bits), b (m, bits) of a float dtype.

    A Hamming distance is (bits - dot) / 2. In fp16 (the fast GPU path) each slice of at most 2048
    bits is exact, since its partial sums are integers of magnitude <= 2048.
    """
    int32 = _torch().int32
    dot = None
    for start in range(0, a.shape[1], EXACT_FP16_BITS):
        part = (a[:, start : start + EXACT_FP16_BITS] @ b[:, start : start + EXACT_FP16_BITS].T).to(int32)
        dot = part if dot is None else dot + part
    return dot


def matmul_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU (exact, see `plus_minus_dot`); float32 elsewhere, where fp16 matmul is slow."""
    torch = _torch()
    return torch.float16 if device.type == "cuda" else torch.float32


def _hamming_torch(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    dtype = matmul_dtype(a.device)
    return (bits - plus_minus_dot(plus_minus_one(a, bits, dtype), plus_minus_one(b, bits, dtype))) // 2


def hamming_distance(a, b, bits: Optional[int] = None) -> Array:
    """Hamming distances (n, m) int32 between codes a (n, b) and b (m, b).

    Codes as in `as_packed` (`bits` applies to packed input). numpy in, numpy out (faiss when
    installed, else numpy popcount); if either is a tensor the result is a tensor, computed with a
    matmul of +-1 codes on a GPU and with the numpy kernels for CPU tensors.
    """
    a, bits_a = as_packed(a, bits, "a")
    b, bits_b = as_packed(b, bits, "b")
    if bits_a != bits_b:
        raise DmuhError(f"b: codes of {bits_b} bits cannot be compared with codes of {bits_a} bits")
    tensors = [x for x in (a, b) if _is_tensor(x)]
    if not tensors:
        return _hamming_numpy(a, b)
    torch = _torch()
    device = next((x.device for x in tensors if x.device.type != "cpu"), torch.device("cpu"))
    if device.type == "cpu":
        a, b = (x.cpu().numpy() if _is_tensor(x) else x for x in (a, b))
        return torch.from_numpy(_hamming_numpy(a, b))
    return _hamming_torch(torch.as_tensor(a, device=device), torch.as_tensor(b, device=device), bits_a)
