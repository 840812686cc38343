"""The expert service: the routed experts of every MoE layer on an expert-parallel DeepSpeed job.

__main__    the job supervisor (`python -m services.experts`): starts, watches, restarts ranks
supervisor  Supervisor / JobSpec
rank        one rank process; rank 0 also serves gRPC
pool        DeepSpeed init, the expert-parallel group, one round's collectives
plan        a round's dispatch and combine as tensor math (split / combine / pack / unpack)
shard       one rank's slice of experts, loaded from the checkpoint, and their math
batcher     per-round batching of concurrent calls on rank 0
routed      the pool's shape and one checked call
servicer    Experts gRPC adapter
client      RemoteExperts: the synchronous client prefill and decode attach to their MoE layers
"""
