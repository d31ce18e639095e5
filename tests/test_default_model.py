"""The embedded default pair (dspark_ops/decoding/weights): checksums, loading,
and greedy speculative decoding on it equal to plain greedy decoding. Skipped
when the weights (or safetensors) are absent: CI never depends on them."""
import shutil

import pytest
import torch

from dspark_ops.decoding import DraftModelDrafter, NGramDrafter, SpeculativeDecoder, tokenizer
from dspark_ops.decoding.default import (WEIGHTS_DIR, DefaultWeightsError, default_record, load_default,
                                         load_default_dspark, verify_default)

pytest.importorskip("safetensors")
FILES = ("default.json", "default_target.safetensors", "default_draft.safetensors", "default_dspark.safetensors")
pytestmark = pytest.mark.skipif(not all((WEIGHTS_DIR / f).is_file() for f in FILES),
                                reason="the embedded default weights are not present (tools/train_default.py)")


@pytest.fixture(scope="module")
def pair():
    return load_default()


def test_record_and_checksums():
    rec = verify_default()
    for role in ("target", "draft", "dspark"):
        assert len(rec[role]["sha256"]) == 64
        assert (WEIGHTS_DIR / rec[role]["file"]).stat().st_size == rec[role]["bytes"]
    assert rec["total_bytes"] == sum(rec[r]["bytes"] for r in ("target", "draft", "dspark")) <= 5_000_000
    assert rec["cost_ratio_flops_per_token"] >= 8
    assert rec["target"]["cost"]["flops_per_token"] >= 8 * rec["draft"]["cost"]["flops_per_token"]


def test_altered_or_missing_file_is_a_clear_error(tmp_path):
    for f in FILES:
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    path = tmp_path / "default_draft.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DefaultWeightsError, match="altered"):
        load_default(weights_dir=tmp_path)
    (tmp_path / "default_target.safetensors").unlink()
    with pytest.raises(DefaultWeightsError, match="missing"):
        verify_default(tmp_path)
    with pytest.raises(DefaultWeightsError, match="missing"):
        default_record(tmp_path / "nowhere")


def test_load_default(pair):
    target, draft = pair
    rec = default_record()
    assert target.vocab_size == draft.vocab_size == tokenizer.VOCAB_SIZE
    for m, role in ((target, "target"), (draft, "draft")):
        assert m.model.cfg.to_dict() == rec[role]["config"]
        assert all(p.dtype == torch.float32 for p in m.model.parameters())
        assert sum(p.numel() for p in m.model.parameters()) == rec[role]["cost"]["params"]
    # trained, not random: the target predicts Python far better than uniform (8.0 bits/byte)
    assert rec["target"]["training"]["final_val_bpb"] < 4.0


def test_greedy_speculative_equals_plain(pair):
    target, draft = pair
    prompts = [tokenizer.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    "),
               tokenizer.encode("import os\n")]
    plain = SpeculativeDecoder(target).generate(prompts, max_new_tokens=24)
    ngram = SpeculativeDecoder(target, NGramDrafter(max_ngram=3, num_draft=5)).generate(prompts, max_new_tokens=24)
    model = SpeculativeDecoder(target, DraftModelDrafter(draft, num_draft=3)).generate(prompts, max_new_tokens=24)
    assert [len(t) for t in plain.tokens] == [24, 24]
    assert ngram.tokens == plain.tokens
    assert model.tokens == plain.tokens
    assert ngram.stats["target_passes"] <= plain.stats["target_passes"]


def test_dspark_head_loads_checked_and_drafts_what_the_target_accepts(pair, tmp_path):
    target, _ = pair
    rec = default_record()["dspark"]
    drafter = load_default_dspark(target)
    assert sum(p.numel() for p in drafter.head.parameters()) == rec["params"]
    assert drafter.temperatures.tolist() == pytest.approx(rec["confidence_temperatures"])
    # trained, not random: on held-out files most first drafts agree with the target
    assert rec["held_out"]["greedy_agreement_per_position"][0] > 0.6
    assert rec["held_out"]["expected_accepted_t1"] > 4 * rec["held_out_before"]["expected_accepted_t1"]
    prompts = [tokenizer.encode("class Point:\n\n    def __init__(self, x, y):\n        self.x = x\n        "),
               tokenizer.encode("import os\n")]
    plain = SpeculativeDecoder(target).generate(prompts, max_new_tokens=32)
    res = SpeculativeDecoder(target, drafter).generate(prompts, max_new_tokens=32)
    assert res.tokens == plain.tokens
    assert res.stats["mean_accepted"] > 1.0, res.stats["mean_accepted"]
    for f in FILES:
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    path = tmp_path / "default_dspark.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DefaultWeightsError, match="altered"):
        load_default_dspark(target, weights_dir=tmp_path)
    with pytest.raises(DefaultWeightsError, match="altered"):
        verify_default(tmp_path)


@pytest.mark.parametrize("device,message", [
    ("bogus", "--device 'bogus' is not a device (cpu or cuda)"),
    ("mps", "--device 'mps': the demo runs on cpu or cuda"),
] + ([] if torch.cuda.is_available() else [("cuda", "--device cuda: no CUDA device is available")]))
def test_demo_refuses_a_device_it_cannot_use_in_one_line(device, message):
    pytest.importorskip("tqdm")
    from dspark_ops.demo_decoding import main
    with pytest.raises(SystemExit) as err:
        main(["--device", device])
    assert str(err.value).startswith(f"dspark_ops demo: {message}")
