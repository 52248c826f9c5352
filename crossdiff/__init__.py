"""Model diffing with sparse crosscoders: the library under the reference's files (train.py,
trainer.py, crosscoder.py, buffer.py, utils.py at the repository's top). Each folder is one job,
and a folder imports only itself and the ones before it in this list:

    io/       files: checkpoints, published crosscoders, the W&B log
    config/   the config table and presets, the command line, what a config implies and its checks
    arch/     the architectures' maths: BatchTopK, the sparse step, partitions, latent shards
    scale/    the processes: torch.distributed groups, process settings, what a run costs
    sources/  where tokens and activations come from: models, positions, token mixes, the store
    diffing/  the model-diffing measures and figures, the latent dashboard
    pairs/    built pairs: the toy pair, Gemma-3-270m offline from PyPI
"""
