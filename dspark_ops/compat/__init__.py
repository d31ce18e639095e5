"""Drop-in shims with other engines' signatures over dspark_ops' ops (no
kernels of their own): ``compat.flashinfer.chain_speculative_sampling``,
``compat.vllm.rejection_sample`` and ``compat.sglang.verify_tree_greedy`` /
``tree_speculative_sampling_target_only``. Each module's docstring says what
differs from the original and what any conversion costs."""
from . import flashinfer, sglang, vllm

__all__ = ["flashinfer", "sglang", "vllm"]
