"""The training runtime both trainers share (`moekit train`'s LM job, `moekit finetune`'s).

loop       run(job, cfg, topo): cadence, tracking, accumulation, clipping, the guard
config     RunConfig: the fields every run has
files      the atomic file layer: publish, verify, list_checkpoints, CheckpointError
sharded    the DCP layout: save_sharded, latest_sharded, load_sharded
tracking   MLflow (sqlite in the run directory) or none
health     router load [L, E] -> one set of metric names
plots      loss curves, expert-load heatmaps
data       token caches on disk (memory-mapped), packing, batches
"""
