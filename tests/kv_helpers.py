"""Random caches and keep sets for kv_compact tests."""
import torch


def random_keep(R, K, app_max, g, empty=True, full=True):
    """base_len, num_appended, keep_index [R, K] (-1 padded), num_keep: random
    strictly increasing keep sets, including empty and full ones."""
    num_appended = torch.randint(0, app_max + 1, (R,), generator=g, dtype=torch.int32)
    keep_index = torch.full((R, K), -1, dtype=torch.int32)
    num_keep = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        app = int(num_appended[r])
        nk = int(torch.randint(0, min(app, K) + 1, (1,), generator=g))
        if r == 0 and full:
            nk = min(app, K)
        if r == 1 and empty:
            nk = 0
        keep = torch.sort(torch.randperm(app, generator=g)[:nk]).values
        keep_index[r, :nk] = keep.to(torch.int32)
        num_keep[r] = nk
    return num_appended, keep_index, num_keep


def random_caches(L, R, S, H, D, dtype, g, heads_first=False):
    shape = (R, H, S, D) if heads_first else (R, S, H, D)
    out = []
    for _ in range(L):
        if dtype == torch.uint8:
            out.append(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))
        else:
            out.append(torch.randn(shape, generator=g).to(dtype))
    return out
