"""dspark_ops.decoding: the thin orchestrator of DESIGN §3 — speculative
decoding loops (draft -> verify -> rollback -> commit) on our ops, with the
built-in model, prompt-lookup, draft-model and DSpark block drafters."""
from .drafters import Draft, DraftModelDrafter, Drafter, NGramDrafter, Sampling
from .convert import builtin_from_hf
from .default import load_default, load_default_dspark
from .dspark import DSparkConfig, DSparkDrafter, DSparkHead
from .hf import HFCache, HFTarget
from .loop import GenerateResult, SpeculativeDecoder, request_seed
from .model import BuiltinModel, KVCache, ModelConfig
from .targets import BuiltinTarget, Target

__all__ = ["BuiltinModel", "BuiltinTarget", "DSparkConfig", "DSparkDrafter", "DSparkHead", "Draft", "DraftModelDrafter",
           "Drafter", "GenerateResult", "HFCache", "HFTarget", "KVCache", "ModelConfig", "NGramDrafter",
           "builtin_from_hf", "load_default", "load_default_dspark", "Sampling", "SpeculativeDecoder", "Target",
           "request_seed"]
