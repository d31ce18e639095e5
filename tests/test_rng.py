"""The reference's Philox and uniform formula (DESIGN §2); the C++ twin is
checked in tests/cpp/test_core.cpp against the same vectors."""
import torch

from dspark_ops import reference as ref

KATS = [  # Random123 tests/kat_vectors, philox4x32 10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_reference_philox_known_answers():
    for ctr, key, want in KATS:
        got = ref.philox4x32_10(tuple(torch.tensor(c) for c in ctr), tuple(torch.tensor(k) for k in key))
        assert [int(v) for v in got] == list(want)


def test_counter_layout_and_lanes():
    seed, position, purpose, slot = 0x0123456789ABCDEF, (5 << 32) | 7, 2, 9
    bits = ref.random_bits(seed, position, purpose, slot, 14)
    for vocab in range(14):
        block = ref.philox4x32_10(
            tuple(torch.tensor(c) for c in (vocab >> 2, slot | purpose << 16, 7, 5)),
            (torch.tensor(0x89ABCDEF), torch.tensor(0x01234567)))
        assert int(bits[vocab]) == int(block[vocab & 3])


def test_uniform_open_interval():
    bits = torch.tensor([0, 1 << 9, 0xFFFFFFFF, 0x7FFFFFFF], dtype=torch.int64)
    u = ref.uniform_from_bits(bits)
    assert u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert float(u[2]) == 1.0 - 2.0 ** -24 and float(u[0]) == 2.0 ** -24
    assert bool(torch.isfinite(ref.exponential_from_bits(bits)).all())


def test_uniform_is_uniform():
    bits = ref.random_bits(1, 2, 3, 4, 1 << 16)
    u = ref.uniform_from_bits(bits).double()
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
