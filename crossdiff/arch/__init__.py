"""The architectures' maths: BatchTopK, the sparse step, partitioned dictionaries, latent shards."""
