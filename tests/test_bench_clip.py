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
    assert [c.op for c in cases] == ["clip_image_features"] + ["clip_text_features"] * 3
    for case in cases:
        case.cpu_rounds, case.cpu_warmup = 1, 0
        rows = run_case(case, "cpu", {"fp32_tflops": 1.0, "copy_gbps": 1.0})
        assert [r["backend"] for r in rows] == [bench_clip.HF_PEER, "ctxkern.cpu Clip"]
        for row in rows:
            assert "error" not in row and "note" not in row, row
            assert row["items_per_s"] > 0 and row["speedup_vs_peer"] > 0 and row["tflops"] > 0


@pytest.mark.parametrize("set_name, make, distinct", bench_clip.PROMPT_SETS)
def test_prompt_sets_are_real_length_prompts(set_name, make, distinct):
    prompts = make(64)
    assert len(set(prompts)) == 64
    ids, mask = bench_clip.prompt_ids(prompts, "cpu", distinct_words=distinct)
    lengths = mask.sum(1)
    assert ids.shape == (64, int(lengths.max())) and 6 <= int(lengths.min()) and int(lengths.max()) <= 16
    assert (ids[:, 0] == 49406).all() and (ids[range(64), lengths - 1] == 49407).all()
    real = ids[:, 1:][mask[:, 1:] == 1]
    real = real[real != 49407]
    if distinct:                                     # no two prompts share a token past BOS
        assert len(real.unique()) == len(real)
    else:                                            # the same word, the same id: "a photo of a" repeats
        assert len(real.unique()) < len(real) / 2


def test_the_first_set_is_the_issues_short_prompts():
    assert bench_clip.PROMPT_SETS[0][1](64) == [f"a photo of a {label}." for label in bench_clip.LABELS]
