"""benchmarks/bench_gpu.py's printed table, from results shaped as its JSON holds them (the timings themselves run
on the device only)."""


def test_table_has_a_row_per_training_mode_and_names_oom(benchmark_script):
    bench = benchmark_script("bench_gpu")
    results = [
        {"model": "BSMamba2", "backend": "triton", "batch": 8, "audio_s_per_s": 786.46,
         "rel_err_bf16_vs_plain_fp32": 1.06e-2, "rel_err_fp32_vs_plain_fp32": 1.04e-3,
         "training": [{"train_s_per_step": 0.284, "train_peak_gib": 75.4, "checkpointing": False},
                      {"train_s_per_step": 0.3352, "train_peak_gib": 20.19, "checkpointing": True}]},
        {"model": "BSMamba2", "backend": "torch", "batch": 8, "audio_s_per_s": 27.6,
         "training": [{"train_oom": True, "checkpointing": False},
                      {"train_s_per_step": 5.12, "train_peak_gib": 96.0, "checkpointing": True}]},
        {"model": "BS-RoFormer", "backend": "-", "batch": 8, "audio_s_per_s": 374.6},  # --no-train
    ]
    lines = bench.format_table(results).splitlines()
    assert lines[0].split()[:4] == ["model", "backend", "batch", "audio-s/s"]
    assert lines[1].split() == ["BSMamba2", "triton", "8", "786.5", "0.284", "75.4", "False", "1.06e-02",
                                "(1.0e-03)"]
    assert lines[2].split() == ["0.335", "20.2", "True"]  # the checkpointed run: its own row, training only
    assert lines[3].split() == ["BSMamba2", "torch", "8", "27.6", "5.120", "96.0", "True", "-"]
    assert lines[4].split() == ["training", "OOM", "with", "checkpointing=False"]
    assert lines[5].split() == ["BS-RoFormer", "-", "8", "374.6", "nan", "nan", "-", "-"]
    assert len(lines) == 6
