"""Batch jobs, a layer on top of the pipeline: work split (torchrun ranks, --shard), atomic part
files, resume, merge, JSON Lines.

Layout beside the output `OUT`: a work directory `OUT.parts/` holding
- `config.json`: everything that determines the results; a different configuration refuses to resume;
- `items.parquet`: the full input list (index, image_id, path, coco_id); a different list refuses,
  and `tagclip merge` uses it to prove that every index 0..total-1 has a row;
- `plan.arrow`: the input list as columns with the input it was listed from, in record batches of
  one window, so that later `--shard` tasks and torchrun ranks read only their share of it instead
  of listing again (`plan`; an earlier version's `plan.parquet` is read whole);
- `listing/*.parquet`: the pieces of the input list written by `--shard` tasks that listed only
  their own Parquet row groups (no plan yet); `tagclip merge` makes `items.parquet` of them (`listing`);
- `job.json`: the final format and the batching that was used;
- `part-<first index>-<last index>.parquet`: result rows, each file written atomically;
- `manifest/<host>-<pid>-<random>.jsonl`: one line per part file (its runs of indices, rows, failed
  indices), one file per writing process, so that resume and merge need not open every part.
Beside them, `OUT.lock` (or `OUT.shard-I-of-N.lock`) names the live run writing that share of the
output; a second run on it refuses before loading the model (see "one writer per output").

Work is cut into windows of consecutive global indices (a few batches each); window w belongs to
global rank w % world. A window is processed by one process, with forward batches that depend only
on the window's images, and is written only when complete. So any split (one process, torchrun
ranks, --shard, a killed and restarted run) computes every image in exactly the same batch and the
merged output is identical. The merge reads each part once and streams the rows in index order;
its time is O(rows) whatever the number of shards, and its memory does not grow with the number of
images.

Modules: `placement` (--shard, torchrun ranks), `session` (the process group), `plan` (the input
list written once), `listing` (a shard task's piece of it), `locks` (one writer per output),
`parts` (the work directory, resume, merge), `manifest` (what each part holds), `merge` (the
streaming merge), `sinks` (JSON Lines, part files), `runner` (`run_job`, `JobSpec`, `Summary`).
Import the names from their module.
"""
