"""`ctxkern bench --op clip`'s cases on a tiny configuration (the real sizes take minutes on a CPU): every
candidate passes the float64 check, and the rows carry images/s or texts/s and the ratio to transformers."""
import pytest
import transformers

from ctxkern.bench import clip as bench_clip
from ctxkern.bench.case import run_case


def tiny_config(patch):
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=patch), projection_dim=16)


def test_clip_cases_check_and_time(monkeypatch):
    monkeypatch.setattr(bench_clip, "_hf_config", tiny_config)
    cases = bench_clip.cases("cpu", quick=True, with_compile=False)
    assert [c.op for c in cases] == ["clip_image_features", "clip_text_features", "clip_text_features"]
    for case in cases:
        case.cpu_rounds, case.cpu_warmup = 1, 0
        rows = run_case(case, "cpu", {"fp32_tflops": 1.0, "copy_gbps": 1.0})
        assert [r["backend"] for r in rows] == [bench_clip.HF_PEER, "ctxkern.cpu Clip"]
        for row in rows:
            assert "error" not in row and "note" not in row, row
            assert row["items_per_s"] > 0 and row["speedup_vs_peer"] > 0 and row["tflops"] > 0


@pytest.mark.parametrize("zero_shot", [True, False])
def test_prompt_ids_are_real_length_prompts(zero_shot):
    ids, mask = bench_clip.prompt_ids(64, "cpu", zero_shot=zero_shot)
    lengths = mask.sum(1)
    assert ids.shape == (64, int(lengths.max())) and 6 <= int(lengths.min()) and int(lengths.max()) <= 16
    assert (ids[:, 0] == 49406).all() and (ids[range(64), lengths - 1] == 49407).all()
    # "a photo of a cat." and "a bad photo of a cat.": the same word, the same id; captions share none.
    first, second = ids[0, 1:6].tolist(), ids[1, 1:7].tolist()
    if zero_shot:
        assert first[:1] == second[:1] and first[1:] == second[2:]
    else:
        real = ids[:, 1:][mask[:, 1:] == 1]
        real = real[real != 49407]
        assert len(real.unique()) == len(real)
