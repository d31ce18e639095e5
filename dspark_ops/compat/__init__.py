"""Drop-in shims with other engines' signatures over dspark_ops' ops (no
kernels of their own): ``compat.flashinfer.chain_speculative_sampling`` and
``compat.vllm.rejection_sample``. Each module's docstring says what differs
from the original and what any conversion costs."""
from . import flashinfer, vllm

__all__ = ["flashinfer", "vllm"]
