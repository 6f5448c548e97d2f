"""The conversion pipeline: a checkpoint folder in, a converted checkpoint folder out.

conversion.py  `convert_checkpoint`: the `Conversion` and its phases (open, plan, check, write, verify, finish)
source.py      reading SOURCE: folder or hub id, config, shard headers, the checks before writing
planning.py    every output tensor's dtype, shape and shard, from sizes alone
writing.py     the shards streamed tensor by tensor, the side files, the re-read check
output.py      OUTPUT on disk: lock, temporary folder, the rename into place
report.py      the report, the model card and the provenance file
merge.py       the conversion of a model held in memory (`convert_model`) and the G checks
"""
