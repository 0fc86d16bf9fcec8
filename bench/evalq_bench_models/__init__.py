"""lmms-eval models for evalq's benchmarks, found through `LMMS_EVAL_PLUGINS=evalq_bench_models`
with `bench/` on `PYTHONPATH`."""
